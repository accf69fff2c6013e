{{/* Every object of one service, separated as a multi-document YAML stream. */}}
{{- define "ledgerlens-service.all" -}}
{{- include "ledgerlens-service.checks" . }}
---
{{ include "ledgerlens-service.serviceAccount" . }}
---
{{ include "ledgerlens-service.configMap" . }}
---
{{- if .svc.gatewayConfig }}
{{ include "ledgerlens-service.gatewayConfigMap" . }}
---
{{- end }}
{{ include "ledgerlens-service.secret" . }}
---
{{ include "ledgerlens-service.service" . }}
---
{{ include "ledgerlens-service.workload" . }}
{{- if .svc.canary.enabled }}
---
{{ include "ledgerlens-service.analysisTemplate" . }}
{{- end }}
{{- if .svc.autoscaling.enabled }}
{{- if eq (.svc.autoscaling.provider | default .root.Values.global.autoscaling.provider) "keda" }}
---
{{ include "ledgerlens-service.scaledObject" . }}
{{- else }}
---
{{ include "ledgerlens-service.hpa" . }}
{{- end }}
{{- end }}
{{- if .svc.pdb.enabled }}
---
{{ include "ledgerlens-service.pdb" . }}
{{- end }}
{{- if .root.Values.networkPolicy.enabled }}
---
{{ include "ledgerlens-service.networkPolicy" . }}
{{- end }}
{{- if .root.Values.monitoring.serviceMonitor.enabled }}
---
{{ include "ledgerlens-service.serviceMonitor" . }}
{{- end }}
{{- end -}}
