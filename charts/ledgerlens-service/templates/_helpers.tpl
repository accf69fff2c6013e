{{/* Common labels for every object of one service. */}}
{{- define "ledgerlens-service.labels" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/part-of: ledgerlens
{{- end -}}
