"""The Pod Security Standards' ``baseline`` and ``restricted`` checks (latest version), as a test helper.

What the PodSecurity admission controller (k8s.io/pod-security-admission, ``policy/check_*.go``)
enforces on a pod in a namespace labelled ``pod-security.kubernetes.io/enforce: restricted``, written
down from the published standard (kubernetes.io/docs/concepts/security/pod-security-standards) and
those checks. ``violations(pod_spec)`` returns one line per failed check, "<check id>: <detail>", empty
when the pod would be admitted. No library on PyPI implements the standard, hence this module.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

# baseline: capabilities a container may add.
BASELINE_CAPABILITIES = {
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
}
# baseline: the "safe" sysctls.
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
    "net.ipv4.tcp_rmem",
    "net.ipv4.tcp_wmem",
}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
# restricted: the only volume sources allowed.
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
_PROBES = ("livenessProbe", "readinessProbe", "startupProbe")


def _containers(spec: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    for key in ("initContainers", "containers", "ephemeralContainers"):
        yield from spec.get(key) or []


def _ctx(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("securityContext") or {}


def baseline(spec: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> list[str]:
    out: list[str] = []
    pod = _ctx(spec)
    meta = meta or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            out.append(f"hostNamespaces: {key}=true")
    if (pod.get("windowsOptions") or {}).get("hostProcess"):
        out.append("hostProcess: pod sets windowsOptions.hostProcess=true")
    for v in spec.get("volumes") or []:
        if "hostPath" in v:
            out.append(f"hostPathVolumes: volume {v['name']!r}")
    for name in pod.get("sysctls") or []:
        if name.get("name") not in SAFE_SYSCTLS:
            out.append(f"sysctls: {name.get('name')}")
    if (pod.get("seccompProfile") or {}).get("type") == "Unconfined":
        out.append("seccompProfile_baseline: pod sets Unconfined")
    if (pod.get("appArmorProfile") or {}).get("type") == "Unconfined":
        out.append("appArmorProfile: pod sets Unconfined")
    for key, value in (meta.get("annotations") or {}).items():
        if (
            key.startswith("container.apparmor.security.beta.kubernetes.io/")
            and value not in ("runtime/default")
            and not value.startswith("localhost/")
        ):
            out.append(f"appArmorProfile: annotation {key}={value}")
    se = pod.get("seLinuxOptions") or {}
    if se.get("type", "") not in SELINUX_TYPES or se.get("user") or se.get("role"):
        out.append("seLinuxOptions: pod")
    for c in _containers(spec):
        ctx = _ctx(c)
        name = c.get("name")
        if ctx.get("privileged"):
            out.append(f"privileged: container {name!r}")
        if (ctx.get("windowsOptions") or {}).get("hostProcess"):
            out.append(f"hostProcess: container {name!r}")
        added = set((ctx.get("capabilities") or {}).get("add") or [])
        if added - BASELINE_CAPABILITIES:
            out.append(
                f"capabilities_baseline: container {name!r} adds {sorted(added - BASELINE_CAPABILITIES)}"
            )
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                out.append(f"hostPorts: container {name!r} hostPort {port['hostPort']}")
        if ctx.get("procMount", "Default") != "Default":
            out.append(f"procMount: container {name!r}")
        if (ctx.get("seccompProfile") or {}).get("type") == "Unconfined":
            out.append(f"seccompProfile_baseline: container {name!r} sets Unconfined")
        if (ctx.get("appArmorProfile") or {}).get("type") == "Unconfined":
            out.append(f"appArmorProfile: container {name!r} sets Unconfined")
        se = ctx.get("seLinuxOptions") or {}
        if se.get("type", "") not in SELINUX_TYPES or se.get("user") or se.get("role"):
            out.append(f"seLinuxOptions: container {name!r}")
        for probe in _PROBES:
            for handler in ("httpGet", "tcpSocket"):
                if ((c.get(probe) or {}).get(handler) or {}).get("host"):
                    out.append(f"hostProbesAndHostLifecycle: container {name!r} {probe}.{handler}.host")
        for hook in ("postStart", "preStop"):
            for handler in ("httpGet", "tcpSocket"):
                if (((c.get("lifecycle") or {}).get(hook) or {}).get(handler) or {}).get("host"):
                    out.append(
                        f"hostProbesAndHostLifecycle: container {name!r} lifecycle.{hook}.{handler}.host"
                    )
    return out


def restricted(spec: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> list[str]:
    """Every baseline and restricted check the pod fails (empty: admitted under ``restricted``)."""
    out = baseline(spec, meta)
    pod = _ctx(spec)
    for v in spec.get("volumes") or []:
        sources = set(v) - {"name"}
        if not sources <= RESTRICTED_VOLUMES:
            out.append(f"restrictedVolumes: volume {v['name']!r} is {sorted(sources - RESTRICTED_VOLUMES)}")
    pod_non_root = pod.get("runAsNonRoot")
    if pod_non_root is False:
        out.append("runAsNonRoot: pod sets runAsNonRoot=false")
    if pod.get("runAsUser") == 0:
        out.append("runAsUser: pod sets runAsUser=0")
    pod_seccomp = (pod.get("seccompProfile") or {}).get("type")
    for c in _containers(spec):
        ctx = _ctx(c)
        name = c.get("name")
        if ctx.get("allowPrivilegeEscalation") is not False:
            out.append(f"allowPrivilegeEscalation: container {name!r} must set it to false")
        non_root = ctx.get("runAsNonRoot")
        if non_root is False or (non_root is None and pod_non_root is not True):
            out.append(f"runAsNonRoot: container {name!r} (or the pod) must set runAsNonRoot=true")
        if ctx.get("runAsUser") == 0:
            out.append(f"runAsUser: container {name!r} sets runAsUser=0")
        seccomp = (ctx.get("seccompProfile") or {}).get("type") or pod_seccomp
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(
                f"seccompProfile_restricted: container {name!r} (or the pod) must set RuntimeDefault or "
                "Localhost"
            )
        caps = ctx.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"capabilities_restricted: container {name!r} must drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"capabilities_restricted: container {name!r} adds {sorted(caps['add'])}")
    return out


def pod_template_violations(workload: Mapping[str, Any]) -> list[str]:
    """``restricted`` on the pod a Deployment (or any workload with a pod template) would create."""
    template = workload["spec"]["template"]
    return restricted(template["spec"], template.get("metadata"))
