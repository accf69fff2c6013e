{{- define "ledgerlens-service.service" -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "ledgerlens-service.fullname" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "ledgerlens-service.labels" . | nindent 4 }}
spec:
  type: ClusterIP
  selector:
    {{- include "ledgerlens-service.selectorLabels" . | nindent 4 }}
  ports:
    - name: grpc
      port: {{ .svc.grpcPort }}
      targetPort: grpc
      protocol: TCP
      appProtocol: grpc
    - name: http
      port: {{ .svc.httpPort }}
      targetPort: http
      protocol: TCP
      appProtocol: http
{{- end -}}

{{- define "ledgerlens-service.serviceAccount" -}}
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ include "ledgerlens-service.fullname" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "ledgerlens-service.labels" . | nindent 4 }}
  {{- with .svc.serviceAccount.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
automountServiceAccountToken: false
{{- end -}}

{{- define "ledgerlens-service.configMap" -}}
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ include "ledgerlens-service.fullname" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "ledgerlens-service.labels" . | nindent 4 }}
data:
  {{- range $k, $val := (include "ledgerlens-service.configEnv" . | fromYaml) }}
  {{ $k }}: {{ $val | toString | quote }}
  {{- end }}
{{- end -}}

{{- define "ledgerlens-service.secret" -}}
apiVersion: v1
kind: Secret
metadata:
  name: {{ include "ledgerlens-service.fullname" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "ledgerlens-service.labels" . | nindent 4 }}
type: Opaque
{{- $data := include "ledgerlens-service.secretEnv" . | fromYaml }}
{{- if $data }}
stringData:
  {{- range $k, $val := $data }}
  {{ $k }}: {{ $val | toString | quote }}
  {{- end }}
{{- else }}
stringData: {}
{{- end }}
{{- end -}}

{{- define "ledgerlens-service.pdb" -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "ledgerlens-service.fullname" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "ledgerlens-service.labels" . | nindent 4 }}
spec:
  {{- if hasKey .svc.pdb "minAvailable" }}
  minAvailable: {{ .svc.pdb.minAvailable }}
  {{- else }}
  maxUnavailable: {{ .svc.pdb.maxUnavailable | default 1 }}
  {{- end }}
  unhealthyPodEvictionPolicy: AlwaysAllow
  selector:
    matchLabels:
      {{- include "ledgerlens-service.selectorLabels" . | nindent 6 }}
{{- end -}}

{{- define "ledgerlens-service.serviceMonitor" -}}
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata:
  name: {{ include "ledgerlens-service.fullname" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "ledgerlens-service.labels" . | nindent 4 }}
    {{- with .root.Values.monitoring.serviceMonitor.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  selector:
    matchLabels:
      {{- include "ledgerlens-service.selectorLabels" . | nindent 6 }}
  endpoints:
    - port: http
      path: /metrics
      interval: {{ .root.Values.monitoring.serviceMonitor.interval }}
      scrapeTimeout: {{ .root.Values.monitoring.serviceMonitor.scrapeTimeout }}
      # the RPC histogram carries its own "service" label (the gRPC service); keep it
      # rather than renaming it exported_service in favour of the Kubernetes Service's
      honorLabels: true
  {{- if .svc.canary.enabled }}
  # the canary analysis tells canary pods from stable ones by this label
  podTargetLabels:
    - rollouts-pod-template-hash
  {{- end }}
{{- end -}}


{{/*
inference's gateway configuration (providers and router) as a file, for
LEDGERLENS_INFERENCE_PROVIDERS_FILE. Provider keys are referenced by env name
(api_key_env) and come from a Secret; the checks refuse an api_key here.
*/}}
{{- define "ledgerlens-service.gatewayConfigMap" -}}
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ include "ledgerlens-service.fullname" . }}-gateway
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "ledgerlens-service.labels" . | nindent 4 }}
data:
  gateway.yaml: |
    {{- toYaml .svc.gatewayConfig | nindent 4 }}
{{- end -}}
