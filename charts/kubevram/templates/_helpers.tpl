{{/*
Names, labels and images shared by every template.
Names are truncated to 63 characters (the DNS label limit) because some Kubernetes name fields are
limited to that.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "kubevram.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The full name: fullnameOverride, else "<release>-<chart>", else just the release name when it
already contains the chart name.
*/}}
{{- define "kubevram.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "<chart>-<version>" as the helm.sh/chart label wants it. */}}
{{- define "kubevram.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of the operator's resources. */}}
{{- define "kubevram.labels" -}}
{{ include "kubevram.commonLabels" . }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* Labels every resource carries, without the component. */}}
{{- define "kubevram.commonLabels" -}}
helm.sh/chart: {{ include "kubevram.chart" . }}
app.kubernetes.io/name: {{ include "kubevram.name" . }}
app.kubernetes.io/instance: {{ .Release.Name | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubevram
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels that select the operator pod; never change them between releases. */}}
{{- define "kubevram.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubevram.name" . }}
app.kubernetes.io/instance: {{ .Release.Name | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* "  annotations:" from commonAnnotations (indented for metadata), or nothing. */}}
{{- define "kubevram.annotations" -}}
{{- with .Values.commonAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
{{- end }}
{{- end -}}

{{/* The operator's ServiceAccount name. */}}
{{- define "kubevram.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kubevram.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The PriorityClass of the placeholder pods. */}}
{{- define "kubevram.placeholderPriorityClassName" -}}
{{- default (printf "%s-placeholder" (include "kubevram.fullname" .)) .Values.placeholders.priorityClass.name -}}
{{- end -}}

{{/* ConfigMap holding the node classes as JSON. */}}
{{- define "kubevram.nodeClassesConfigMapName" -}}
{{- printf "%s-node-classes" (include "kubevram.fullname" .) -}}
{{- end -}}

{{/* "repository:tag" or "repository@digest"; the tag defaults to the chart's appVersion. */}}
{{- define "kubevram.imageRef" -}}
{{- $image := index . 0 -}}
{{- $appVersion := index . 1 -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository (default $appVersion $image.tag | toString) -}}
{{- end -}}
{{- end -}}

{{- define "kubevram.operatorImage" -}}
{{- include "kubevram.imageRef" (list .Values.image .Chart.AppVersion) -}}
{{- end -}}

{{- define "kubevram.workerImage" -}}
{{- include "kubevram.imageRef" (list .Values.workerImage .Chart.AppVersion) -}}
{{- end -}}

{{/*
Cross-field checks the schema cannot express; `fail` stops install and template with the reason.
*/}}
{{- define "kubevram.validateValues" -}}
{{- if and (not .Values.serviceAccount.create) (not .Values.serviceAccount.name) -}}
{{- fail "serviceAccount.name: must name an existing ServiceAccount when serviceAccount.create is false" -}}
{{- end -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.leaderElection.enabled) -}}
{{- fail "replicaCount: more than 1 needs leaderElection.enabled, else several operators plan at once and book the same GPUs" -}}
{{- end -}}
{{- if and (not .Values.placeholders.priorityClass.create) (not .Values.placeholders.priorityClass.name) -}}
{{- fail "placeholders.priorityClass.name: must name an existing PriorityClass when placeholders.priorityClass.create is false" -}}
{{- end -}}
{{- $seen := dict -}}
{{- range .Values.nodeClasses -}}
{{- if hasKey $seen .name -}}
{{- fail (printf "nodeClasses: the name %q appears more than once; each node class needs its own name" .name) -}}
{{- end -}}
{{- $_ := set $seen .name true -}}
{{- end -}}
{{- end -}}
