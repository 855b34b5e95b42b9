{{/*
Names. The chart's objects are "<prefix>-<component>"; the prefix is fullnameOverride, or
"<release>-<nameOverride or kubeinfer>" (as kube-prometheus-stack does for its components).
Defaults: Deployment kubeinfer-kubeinfer-operator for release "kubeinfer".
*/}}
{{- define "kubeinfer.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kubeinfer.prefix" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "kubeinfer.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* "<prefix>-<component>", at most 63 characters (the prefix is shortened, the component kept):
include "kubeinfer.componentName" (list . "dashboard") */}}
{{- define "kubeinfer.componentName" -}}
{{- $component := index . 1 -}}
{{- $prefix := include "kubeinfer.prefix" (index . 0) | trunc (int (sub 62 (len $component))) | trimSuffix "-" -}}
{{- printf "%s-%s" $prefix $component -}}
{{- end -}}

{{/* The operator's Deployment, ClusterRole, ClusterRoleBinding and PodMonitor. */}}
{{- define "kubeinfer.fullname" -}}
{{- include "kubeinfer.componentName" (list . "operator") -}}
{{- end -}}

{{- define "kubeinfer.labels" -}}
{{ include "kubeinfer.selectorLabels" . }}
app.kubernetes.io/part-of: kubeinfer
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kubeinfer.selectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-operator" (include "kubeinfer.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kubeinfer.serviceAccountName" -}}
{{- default "kubeinfer-operator" .Values.serviceAccount.name -}}
{{- end -}}

{{- define "kubeinfer.operatorImage" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/*
Image pull secret names, as a JSON list: imagePullSecrets, then global.imagePullSecrets (a parent
chart's), duplicates dropped. Entries are {name: NAME} objects (the Kubernetes form) or plain NAME
strings. The operator pod uses them, and the operator gives them to the serving pods it creates
(env KUBEINFER_IMAGE_PULL_SECRETS).
*/}}
{{- define "kubeinfer.imagePullSecretNames" -}}
{{- $names := list -}}
{{- range concat (.Values.imagePullSecrets | default list) ((.Values.global).imagePullSecrets | default list) -}}
{{- if kindIs "string" . -}}
{{- $names = append $names . -}}
{{- else -}}
{{- $names = append $names .name -}}
{{- end -}}
{{- end -}}
{{- $names | uniq | toJson -}}
{{- end -}}

{{/*
"true" when the PodMonitor and PrometheusRule kinds may be rendered: monitoringCRDs is true, or it
is "auto" and the API server serves monitoring.coreos.com/v1 (prometheus-operator's CRDs; `helm
template` sees it only with --api-versions monitoring.coreos.com/v1). Empty otherwise.
*/}}
{{- define "kubeinfer.monitoringApi" -}}
{{- if eq (toString .Values.monitoringCRDs) "auto" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" }}true{{ end -}}
{{- else if .Values.monitoringCRDs -}}
true
{{- end -}}
{{- end -}}

{{/*
The operator's metrics endpoint, named once for the Deployment, the PodMonitor and the alerts:
the container port's name, and the job label its scrape gets (files/kubeinfer-alerts.yaml's
kubeinfer-operator group selects up{job="kubeinfer-operator"}; tests/chart keeps the two equal).
*/}}
{{- define "kubeinfer.metricsPortName" -}}metrics{{- end -}}
{{- define "kubeinfer.operatorJob" -}}kubeinfer-operator{{- end -}}
