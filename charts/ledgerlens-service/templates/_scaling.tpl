{{- define "ledgerlens-service.scaleTargetRef" -}}
{{- if .svc.canary.enabled -}}
apiVersion: argoproj.io/v1alpha1
kind: Rollout
{{- else -}}
apiVersion: apps/v1
kind: Deployment
{{- end }}
name: {{ include "ledgerlens-service.fullname" . }}
{{- end -}}

{{/* The RPC latency PromQL of one service: unary calls of its own gRPC API only. */}}
{{- define "ledgerlens-service.rpcSelector" -}}
{{- printf "service=~\"ledgerlens[.]%s[.].+\",method!~\".*Stream.*\"" .name -}}
{{- end -}}

{{/* HPA on p95 latency: a Pods metric from prometheus-adapter (rule in the umbrella chart), CPU as a floor. */}}
{{- define "ledgerlens-service.hpa" -}}
{{- $a := .svc.autoscaling -}}
{{- $g := .root.Values.global.autoscaling -}}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ include "ledgerlens-service.fullname" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "ledgerlens-service.labels" . | nindent 4 }}
spec:
  scaleTargetRef:
    {{- include "ledgerlens-service.scaleTargetRef" . | nindent 4 }}
  minReplicas: {{ $a.minReplicas }}
  maxReplicas: {{ $a.maxReplicas }}
  metrics:
    - type: Pods
      pods:
        metric:
          name: {{ $g.p95MetricName }}
        target:
          type: AverageValue
          averageValue: {{ $a.p95LatencyTarget | default $g.p95LatencyTarget | quote }}
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $a.cpuUtilization | default $g.cpuUtilization }}
  behavior:
    scaleUp:
      stabilizationWindowSeconds: 0
      policies:
        - type: Pods
          value: 2
          periodSeconds: 60
    scaleDown:
      stabilizationWindowSeconds: {{ $g.scaleDownStabilizationSeconds }}
      policies:
        - type: Percent
          value: 50
          periodSeconds: 60
{{- end -}}

{{/* KEDA alternative: the same p95 (service-wide) through KEDA's Prometheus scaler, plus CPU. */}}
{{- define "ledgerlens-service.scaledObject" -}}
{{- $a := .svc.autoscaling -}}
{{- $g := .root.Values.global.autoscaling -}}
{{- $target := $a.p95LatencyTarget | default $g.p95LatencyTarget -}}
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata:
  name: {{ include "ledgerlens-service.fullname" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "ledgerlens-service.labels" . | nindent 4 }}
spec:
  scaleTargetRef:
    {{- include "ledgerlens-service.scaleTargetRef" . | nindent 4 }}
  minReplicaCount: {{ $a.minReplicas }}
  maxReplicaCount: {{ $a.maxReplicas }}
  pollingInterval: 30
  cooldownPeriod: 300
  advanced:
    horizontalPodAutoscalerConfig:
      behavior:
        scaleDown:
          stabilizationWindowSeconds: {{ $g.scaleDownStabilizationSeconds }}
          policies:
            - type: Percent
              value: 50
              periodSeconds: 60
  triggers:
    - type: prometheus
      name: p95-latency
      metricType: Value
      metadata:
        serverAddress: {{ .root.Values.monitoring.prometheusUrl }}
        query: {{ printf "histogram_quantile(0.95, sum by (le) (rate(ledgerlens_rpc_server_duration_seconds_bucket{namespace=\"%s\",%s}[2m])))" .root.Release.Namespace (include "ledgerlens-service.rpcSelector" .) | quote }}
        threshold: {{ include "ledgerlens-service.seconds" $target | quote }}
        ignoreNullValues: "true"
    - type: cpu
      metricType: Utilization
      metadata:
        value: {{ $a.cpuUtilization | default $g.cpuUtilization | quote }}
{{- end -}}

{{/* A Kubernetes quantity of seconds ("250m", "1", "1.5") as a plain number string. */}}
{{- define "ledgerlens-service.seconds" -}}
{{- $q := toString . -}}
{{- if hasSuffix "m" $q -}}
{{- divf (trimSuffix "m" $q | float64) 1000.0 -}}
{{- else -}}
{{- $q -}}
{{- end -}}
{{- end -}}

{{/* Canary gate: p95 latency and server-fault ratio of the canary's pods (rollouts-pod-template-hash). */}}
{{- define "ledgerlens-service.analysisTemplate" -}}
{{- $c := .root.Values.global.canary -}}
{{- $sel := printf "namespace=\"%s\",%s,rollouts_pod_template_hash=\"{{args.canary-hash}}\"" .root.Release.Namespace (include "ledgerlens-service.rpcSelector" .) -}}
{{- $all := printf "namespace=\"%s\",service=~\"ledgerlens[.]%s[.].+\",rollouts_pod_template_hash=\"{{args.canary-hash}}\"" .root.Release.Namespace .name -}}
apiVersion: argoproj.io/v1alpha1
kind: AnalysisTemplate
metadata:
  name: {{ include "ledgerlens-service.fullname" . }}-canary
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "ledgerlens-service.labels" . | nindent 4 }}
spec:
  args:
    - name: canary-hash
  metrics:
    - name: p95-latency
      interval: {{ $c.analysis.interval }}
      initialDelay: {{ $c.analysis.initialDelay }}
      failureLimit: {{ $c.analysis.failureLimit }}
      # no traffic yet (NaN) is not a failure; a p95 over the bound is
      successCondition: "isNaN(result[0]) || result[0] <= {{ include "ledgerlens-service.seconds" (.svc.canary.p95LatencyMax | default $c.analysis.p95LatencyMax) }}"
      provider:
        prometheus:
          address: {{ .root.Values.monitoring.prometheusUrl }}
          query: {{ printf "histogram_quantile(0.95, sum by (le) (rate(ledgerlens_rpc_server_duration_seconds_bucket{%s}[%s])))" $sel $c.analysis.window | quote }}
    - name: error-rate
      interval: {{ $c.analysis.interval }}
      initialDelay: {{ $c.analysis.initialDelay }}
      failureLimit: {{ $c.analysis.failureLimit }}
      successCondition: "isNaN(result[0]) || result[0] <= {{ .svc.canary.errorRateMax | default $c.analysis.errorRateMax }}"
      provider:
        prometheus:
          address: {{ .root.Values.monitoring.prometheusUrl }}
          query: {{ printf "sum(rate(ledgerlens_rpc_server_duration_seconds_count{%s,code=~\"%s\"}[%s])) / sum(rate(ledgerlens_rpc_server_duration_seconds_count{%s}[%s]))" $all $c.analysis.faultCodes $c.analysis.window $all $c.analysis.window | quote }}
{{- end -}}
