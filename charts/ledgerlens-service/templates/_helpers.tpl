{{/*
The library's templates take one context, built by the umbrella chart for each service:
  (dict "root" $ "name" "<svc>" "svc" .Values.services.<svc>)
Every object of one service comes from "ledgerlens-service.all".
*/}}

{{/* <release>-<svc>, the name of every object of one service. */}}
{{- define "ledgerlens-service.fullname" -}}
{{- printf "%s-%s" .root.Release.Name .name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select one service's pods (stable for the life of the release). */}}
{{- define "ledgerlens-service.selectorLabels" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end -}}

{{/* Common labels for every object of one service. */}}
{{- define "ledgerlens-service.labels" -}}
{{ include "ledgerlens-service.selectorLabels" . }}
app.kubernetes.io/part-of: ledgerlens
app.kubernetes.io/component: {{ .name }}
app.kubernetes.io/version: {{ include "ledgerlens-service.imageTag" . | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" | trunc 63 }}
{{- end -}}

{{- define "ledgerlens-service.imageTag" -}}
{{- .svc.image.tag | default .root.Values.global.image.tag | default .root.Chart.AppVersion -}}
{{- end -}}

{{- define "ledgerlens-service.image" -}}
{{- $repo := .svc.image.repository -}}
{{- with .root.Values.global.image.registry }}{{ $repo = printf "%s/%s" . $repo }}{{ end -}}
{{- if .svc.image.digest -}}
{{- printf "%s@%s" $repo .svc.image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (include "ledgerlens-service.imageTag" .) -}}
{{- end -}}
{{- end -}}

{{/* LEDGERLENS_<SVC>_, the prefix of every setting of one service. */}}
{{- define "ledgerlens-service.envPrefix" -}}
{{- printf "LEDGERLENS_%s_" (upper .name) -}}
{{- end -}}

{{/* The mount path of the service's data_dir (a writable emptyDir). */}}
{{- define "ledgerlens-service.dataDir" -}}
/var/lib/ledgerlens/{{ .name }}
{{- end -}}

{{/* true when the service runs more than one pod at some point. */}}
{{- define "ledgerlens-service.multiReplica" -}}
{{- if or (gt (int .svc.replicas) 1) (and .svc.autoscaling.enabled (gt (int .svc.autoscaling.maxReplicas) 1)) -}}true{{- end -}}
{{- end -}}

{{/* A service's gRPC address inside the cluster (host:port). */}}
{{- define "ledgerlens-service.grpcAddress" -}}
{{- printf "%s-%s.%s.svc:%d" .root.Release.Name .name .root.Release.Namespace (int .svc.grpcPort) -}}
{{- end -}}

{{/* identity's JWKS endpoint, unless global.auth.jwksUrl names another. */}}
{{- define "ledgerlens-service.jwksUrl" -}}
{{- $identity := .root.Values.services.identity -}}
{{- .root.Values.global.auth.jwksUrl | default (printf "http://%s-identity.%s.svc:%d/.well-known/jwks.json" .root.Release.Name .root.Release.Namespace (int $identity.httpPort)) -}}
{{- end -}}

{{/* The services this one talks to (its "uses" plus what its backends imply), as a dict of flags. */}}
{{- define "ledgerlens-service.uses" -}}
{{- $v := .root.Values -}}
{{- $u := dict "nats" true "postgresql" $v.externalPostgresql.enabled "redis" (and .svc.uses.redis $v.externalRedis.enabled) "qdrant" (eq (.svc.backend | default "") "qdrant") "identityHttp" (ne .name "identity") "retrievalGrpc" (and .svc.uses.retrieval $v.services.retrieval.enabled) -}}
{{- toYaml $u -}}
{{- end -}}

{{/* inference's providers/router file: ConfigMap <fullname>-gateway, key gateway.yaml. */}}
{{- define "ledgerlens-service.gatewayConfigDir" -}}
/etc/ledgerlens/gateway
{{- end -}}

{{- define "ledgerlens-service.gatewayConfigFile" -}}
{{- printf "%s/gateway.yaml" (include "ledgerlens-service.gatewayConfigDir" .) -}}
{{- end -}}
