{{/* Names are DNS labels: at most 63 characters, no trailing dash. */}}
{{- define "nextserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "nextserve.fullname" -}}
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

{{- define "nextserve.operatorName" -}}
{{- printf "%s-operator" (include "nextserve.fullname" . | trunc 54 | trimSuffix "-") -}}
{{- end -}}

{{- define "nextserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "nextserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "nextserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "nextserve.labels" -}}
helm.sh/chart: {{ include "nextserve.chart" . }}
{{ include "nextserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: nextserve
{{- end -}}

{{- define "nextserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "nextserve.operatorName" .) .Values.serviceAccount.name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The rules every install grants, cluster-wide or per namespace; arg: dict "peerings" PLURAL. */}}
{{- define "nextserve.rbacRules" -}}
# kopf: watch the deployments, keep its progress in their annotations, write their status.
- apiGroups: [serving.nextserve.io]
  resources: [qwen3nextdeployments]
  verbs: [list, watch, patch]
- apiGroups: [serving.nextserve.io]
  resources: [qwen3nextdeployments/status]
  verbs: [patch]
# kopf: peering between operator replicas (get: the operator's own check that the object exists).
- apiGroups: [kopf.dev]
  resources: [{{ .peerings }}]
  verbs: [get, list, watch, patch]
# kopf: handler progress and errors reported as events on the deployments.
- apiGroups: [""]
  resources: [events]
  verbs: [create]
# The children of each Qwen3NextDeployment (operator/kube.py: VERBS_USED).
- apiGroups: [""]
  resources: [configmaps, services]
  verbs: [get, list, create, patch, delete]
- apiGroups: [apps]
  resources: [statefulsets, deployments]
  verbs: [get, list, create, patch, delete]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, create, patch, delete]
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [get, create, patch, delete]
# The router pods, read only: with a shared cache each is asked about it for CacheReady.
- apiGroups: [""]
  resources: [pods]
  verbs: [list]
{{- end -}}
