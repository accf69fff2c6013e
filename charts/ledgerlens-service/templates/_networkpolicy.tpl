{{/*
One service's NetworkPolicy: with the release's default-deny policy (umbrella chart), these
are the only flows its pods have. The graph they encode is ARCHITECTURE.md's; the chart
tests derive (from, to, port) from the rendered policies and compare it with
tests/chart/service_graph.py.
*/}}
{{- define "ledgerlens-service.peerSelector" -}}
podSelector:
  matchLabels:
    app.kubernetes.io/name: {{ .name }}
    app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end -}}

{{- define "ledgerlens-service.egressRule" -}}
{{- /* (dict "to" peers "ports" (list ports) "protocol" "TCP") */ -}}
- {{- if .to }}
  to:
    {{- toYaml .to | nindent 4 }}
  {{- end }}
  ports:
    {{- range .ports }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
{{- end -}}

{{- define "ledgerlens-service.networkPolicy" -}}
{{- $v := .root.Values -}}
{{- $np := $v.networkPolicy -}}
{{- $u := include "ledgerlens-service.uses" . | fromYaml -}}
{{- $rel := .root.Release.Name -}}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ include "ledgerlens-service.fullname" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "ledgerlens-service.labels" . | nindent 4 }}
spec:
  podSelector:
    matchLabels:
      {{- include "ledgerlens-service.selectorLabels" . | nindent 6 }}
  policyTypes: [Ingress, Egress]
  ingress:
    # the gRPC API: its clients, the ingress controller, the helm test, service callers
    - from:
        - podSelector:
            {{- toYaml $np.clients.podSelector | nindent 12 }}
          {{- if $np.clients.namespaceSelector }}
          namespaceSelector:
            {{- toYaml $np.clients.namespaceSelector | nindent 12 }}
          {{- end }}
        {{- with $np.ingressNamespace }}
        - namespaceSelector:
            matchLabels:
              kubernetes.io/metadata.name: {{ . }}
        {{- end }}
        {{- if $v.tests.enabled }}
        - podSelector:
            matchLabels:
              ledgerlens.io/helm-test: "true"
              app.kubernetes.io/instance: {{ $rel }}
        {{- end }}
        {{- range $caller, $csvc := $v.services }}
        {{- if and $csvc.enabled $csvc.uses.retrieval (eq $.name "retrieval") }}
        - {{- include "ledgerlens-service.peerSelector" (dict "root" $.root "name" $caller) | nindent 10 }}
        {{- end }}
        {{- end }}
      ports:
        - port: {{ .svc.grpcPort }}
          protocol: TCP
    {{- if eq .name "identity" }}
    # the JWKS (and token endpoint) on identity's HTTP port, for every ledgerlens service
    {{- $callers := list }}
    {{- range $caller, $csvc := $v.services }}
    {{- if and $csvc.enabled (ne $caller "identity") }}
    {{- $callers = append $callers $caller }}
    {{- end }}
    {{- end }}
    {{- if $callers }}
    - from:
        {{- range $callers }}
        - {{- include "ledgerlens-service.peerSelector" (dict "root" $.root "name" .) | nindent 10 }}
        {{- end }}
      ports:
        - port: {{ .svc.httpPort }}
          protocol: TCP
    {{- end }}
    {{- end }}
    {{- with $np.monitoringNamespace }}
    # Prometheus scrapes /metrics on the HTTP port (kubelet probes need no rule)
    - from:
        - namespaceSelector:
            matchLabels:
              kubernetes.io/metadata.name: {{ . }}
      ports:
        - port: {{ $.svc.httpPort }}
          protocol: TCP
    {{- end }}
  egress:
    # DNS
    - to:
        - namespaceSelector:
            matchLabels:
              kubernetes.io/metadata.name: {{ $np.dns.namespace }}
          podSelector:
            {{- toYaml $np.dns.podSelector | nindent 12 }}
      ports:
        - port: 53
          protocol: UDP
        - port: 53
          protocol: TCP
    {{- if $v.nats.enabled }}
    {{- include "ledgerlens-service.egressRule" (dict "to" (list (dict "podSelector" (dict "matchLabels" (dict "app.kubernetes.io/name" "nats" "app.kubernetes.io/instance" $rel)))) "ports" (list 4222)) | nindent 4 }}
    {{- else }}
    {{- include "ledgerlens-service.egressRule" (dict "to" $np.dependencies.nats "ports" (list 4222)) | nindent 4 }}
    {{- end }}
    {{- if $u.postgresql }}
    {{- include "ledgerlens-service.egressRule" (dict "to" $np.dependencies.postgresql "ports" (list (int $v.externalPostgresql.port))) | nindent 4 }}
    {{- end }}
    {{- if $u.redis }}
    {{- include "ledgerlens-service.egressRule" (dict "to" $np.dependencies.redis "ports" (list 6379)) | nindent 4 }}
    {{- end }}
    {{- if $u.qdrant }}
    {{- include "ledgerlens-service.egressRule" (dict "to" $np.dependencies.qdrant "ports" (list 6333 6334)) | nindent 4 }}
    {{- end }}
    {{- if $u.identityHttp }}
    {{- include "ledgerlens-service.egressRule" (dict "to" (list (include "ledgerlens-service.peerSelector" (dict "root" .root "name" "identity") | fromYaml)) "ports" (list (int $v.services.identity.httpPort))) | nindent 4 }}
    {{- end }}
    {{- if $u.retrievalGrpc }}
    {{- include "ledgerlens-service.egressRule" (dict "to" (list (include "ledgerlens-service.peerSelector" (dict "root" .root "name" "retrieval") | fromYaml)) "ports" (list (int $v.services.retrieval.grpcPort))) | nindent 4 }}
    {{- end }}
    {{- range .svc.egress }}
    {{- if .cidrs }}
    # {{ .name }}
    {{- $peers := list }}
    {{- range .cidrs }}{{ $peers = append $peers (dict "ipBlock" (dict "cidr" .)) }}{{ end }}
    {{- include "ledgerlens-service.egressRule" (dict "to" $peers "ports" .ports) | nindent 4 }}
    {{- end }}
    {{- end }}
{{- end -}}
