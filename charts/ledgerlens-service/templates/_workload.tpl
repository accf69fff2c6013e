{{/* The pod template shared by the Deployment and the Rollout. */}}
{{- define "ledgerlens-service.podTemplate" -}}
{{- $fullname := include "ledgerlens-service.fullname" . -}}
{{- $v := .root.Values -}}
metadata:
  labels:
    {{- include "ledgerlens-service.labels" . | nindent 4 }}
    {{- with .svc.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include "ledgerlens-service.configEnv" . | sha256sum }}
    checksum/secret: {{ include "ledgerlens-service.secretEnv" . | sha256sum }}
    {{- if .svc.gatewayConfig }}
    checksum/gateway: {{ toYaml .svc.gatewayConfig | sha256sum }}
    {{- end }}
    {{- with .svc.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ $fullname }}
  automountServiceAccountToken: false
  enableServiceLinks: false
  terminationGracePeriodSeconds: {{ .svc.terminationGracePeriodSeconds }}
  {{- with $v.global.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $v.global.podSecurityContext | nindent 4 }}
  {{- if .svc.migrations.enabled }}
  initContainers:
    - name: migrate
      image: {{ include "ledgerlens-service.image" . }}
      imagePullPolicy: {{ $v.global.image.pullPolicy }}
      command: ["python", "-m", "ledgerlens.services.{{ .name }}"]
      args: ["migrate"]
      {{- include "ledgerlens-service.envFrom" . | nindent 6 }}
      securityContext:
        {{- toYaml $v.global.containerSecurityContext | nindent 8 }}
      resources:
        {{- toYaml .svc.resources | nindent 8 }}
      volumeMounts:
        {{- include "ledgerlens-service.volumeMounts" . | nindent 8 }}
  {{- end }}
  containers:
    - name: {{ .name }}
      image: {{ include "ledgerlens-service.image" . }}
      imagePullPolicy: {{ $v.global.image.pullPolicy }}
      command: ["python", "-m", "ledgerlens.services.{{ .name }}"]
      args: ["serve"]
      ports:
        - name: grpc
          containerPort: {{ .svc.grpcPort }}
          protocol: TCP
        - name: http
          containerPort: {{ .svc.httpPort }}
          protocol: TCP
      {{- include "ledgerlens-service.envFrom" . | nindent 6 }}
      {{- with include "ledgerlens-service.podEnv" . }}
      {{- . | nindent 6 }}
      {{- end }}
      startupProbe:
        grpc:
          port: {{ .svc.grpcPort }}
        periodSeconds: {{ .svc.probes.startup.periodSeconds }}
        failureThreshold: {{ .svc.probes.startup.failureThreshold }}
        timeoutSeconds: {{ .svc.probes.timeoutSeconds }}
      livenessProbe:
        grpc:
          port: {{ .svc.grpcPort }}
        periodSeconds: {{ .svc.probes.liveness.periodSeconds }}
        failureThreshold: {{ .svc.probes.liveness.failureThreshold }}
        timeoutSeconds: {{ .svc.probes.timeoutSeconds }}
      readinessProbe:
        grpc:
          port: {{ .svc.grpcPort }}
        periodSeconds: {{ .svc.probes.readiness.periodSeconds }}
        failureThreshold: {{ .svc.probes.readiness.failureThreshold }}
        timeoutSeconds: {{ .svc.probes.timeoutSeconds }}
      securityContext:
        {{- toYaml $v.global.containerSecurityContext | nindent 8 }}
      resources:
        {{- toYaml .svc.resources | nindent 8 }}
      volumeMounts:
        {{- include "ledgerlens-service.volumeMounts" . | nindent 8 }}
  volumes:
    - name: tmp
      emptyDir:
        sizeLimit: {{ .svc.tmpSizeLimit }}
    - name: data
      emptyDir:
        sizeLimit: {{ .svc.dataSizeLimit }}
    {{- if .svc.gatewayConfig }}
    - name: gateway-config
      configMap:
        name: {{ $fullname }}-gateway
        defaultMode: 0444
    {{- end }}
    {{- range .svc.secretMounts }}
    - name: {{ .name }}
      secret:
        secretName: {{ .secretName }}
        defaultMode: 0440
    {{- end }}
  {{- if $v.global.topologySpread.enabled }}
  topologySpreadConstraints:
    - maxSkew: 1
      topologyKey: topology.kubernetes.io/zone
      whenUnsatisfiable: {{ $v.global.topologySpread.zone }}
      labelSelector:
        matchLabels:
          {{- include "ledgerlens-service.selectorLabels" . | nindent 10 }}
    - maxSkew: 1
      topologyKey: kubernetes.io/hostname
      whenUnsatisfiable: {{ $v.global.topologySpread.node }}
      labelSelector:
        matchLabels:
          {{- include "ledgerlens-service.selectorLabels" . | nindent 10 }}
  {{- end }}
  {{- with .svc.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .svc.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{- define "ledgerlens-service.envFrom" -}}
{{- $fullname := include "ledgerlens-service.fullname" . -}}
{{- $ext := include "ledgerlens-service.externalSecrets" . | fromYaml -}}
envFrom:
  - configMapRef:
      name: {{ $fullname }}
  - secretRef:
      name: {{ $fullname }}
  {{- range $ext.names }}
  - secretRef:
      name: {{ . }}
  {{- end }}
{{- end -}}

{{- define "ledgerlens-service.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: data
  mountPath: {{ include "ledgerlens-service.dataDir" . }}
{{- if .svc.gatewayConfig }}
- name: gateway-config
  mountPath: {{ include "ledgerlens-service.gatewayConfigDir" . }}
  readOnly: true
{{- end }}
{{- range .svc.secretMounts }}
- name: {{ .name }}
  mountPath: {{ .mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* A Deployment, or an Argo Rollouts Rollout (canary gated by analysis) when canary.enabled. */}}
{{- define "ledgerlens-service.workload" -}}
{{- $fullname := include "ledgerlens-service.fullname" . -}}
{{- if .svc.canary.enabled }}
apiVersion: argoproj.io/v1alpha1
kind: Rollout
{{- else }}
apiVersion: apps/v1
kind: Deployment
{{- end }}
metadata:
  name: {{ $fullname }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "ledgerlens-service.labels" . | nindent 4 }}
spec:
  {{- if not .svc.autoscaling.enabled }}
  replicas: {{ .svc.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "ledgerlens-service.selectorLabels" . | nindent 6 }}
  template:
    {{- include "ledgerlens-service.podTemplate" . | nindent 4 }}
  {{- if .svc.canary.enabled }}
  {{- $c := .root.Values.global.canary }}
  strategy:
    canary:
      maxSurge: "25%"
      maxUnavailable: 0
      abortScaleDownDelaySeconds: 30
      analysis:
        templates:
          - templateName: {{ $fullname }}-canary
        startingStep: 1
        args:
          - name: canary-hash
            valueFrom:
              podTemplateHashValue: Latest
      steps:
        {{- range (.svc.canary.steps | default $c.steps) }}
        - setWeight: {{ .setWeight }}
        - pause:
            duration: {{ .pause | quote }}
        {{- end }}
  {{- else }}
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxSurge: "25%"
      maxUnavailable: 0
  {{- end }}
{{- end -}}
