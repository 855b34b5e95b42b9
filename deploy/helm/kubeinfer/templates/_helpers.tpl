{{- define "kubeinfer.labels" -}}
app.kubernetes.io/name: kubeinfer-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: kubeinfer
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kubeinfer.selectorLabels" -}}
app.kubernetes.io/name: kubeinfer-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kubeinfer.serviceAccountName" -}}
{{- default "kubeinfer-operator" .Values.serviceAccount.name -}}
{{- end -}}
