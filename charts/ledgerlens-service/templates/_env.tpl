{{/*
The settings a service gets, as env vars named exactly like its pydantic-settings fields
(LEDGERLENS_<SVC>_<FIELD>, nested with "__"). The chart computes the wiring (ports,
data_dir, NATS, JWKS, backends); `services.<svc>.env` / `secretEnv` add or override any
setting by its full env name.
*/}}
{{- define "ledgerlens-service.configEnv" -}}
{{- $p := include "ledgerlens-service.envPrefix" . -}}
{{- $v := .root.Values -}}
{{- $u := include "ledgerlens-service.uses" . | fromYaml -}}
{{- $e := dict -}}
{{- $_ := set $e (print $p "HOST") "0.0.0.0" -}}
{{- $_ = set $e (print $p "GRPC_PORT") (toString .svc.grpcPort) -}}
{{- $_ = set $e (print $p "HTTP_PORT") (toString .svc.httpPort) -}}
{{- $_ = set $e (print $p "DATA_DIR") (include "ledgerlens-service.dataDir" .) -}}
{{- $_ = set $e (print $p "LOG_LEVEL") (.svc.logLevel | default $v.global.logLevel) -}}
{{- if $v.nats.enabled -}}
{{- $_ = set $e (print $p "NATS_URL") (printf "nats://%s-nats.%s.svc:4222" .root.Release.Name .root.Release.Namespace) -}}
{{- else -}}
{{- $_ = set $e (print $p "NATS_URL") $v.externalNats.url -}}
{{- end -}}
{{- $_ = set $e (print $p "AUTH__ENABLED") (toString $v.global.auth.enabled) -}}
{{- $_ = set $e (print $p "AUTH__ISSUER") $v.global.auth.issuer -}}
{{- $_ = set $e (print $p "AUTH__AUDIENCE") $v.global.auth.audience -}}
{{- if $u.identityHttp -}}
{{- $_ = set $e (print $p "AUTH__JWKS_URL") (include "ledgerlens-service.jwksUrl" .) -}}
{{- end -}}
{{- with $v.global.otlpEndpoint -}}
{{- $_ = set $e (print $p "OTLP_ENDPOINT") . -}}
{{- end -}}
{{- with .svc.backend -}}
{{- $_ = set $e (print $p "BACKEND") . -}}
{{- end -}}
{{- if $u.qdrant -}}
{{- $_ = set $e (print $p "QDRANT__URL") $v.externalQdrant.url -}}
{{- end -}}
{{- /* inference answers with passages from this release's retrieval */ -}}
{{- if $u.retrievalGrpc -}}
{{- $r := $v.services.retrieval -}}
{{- $_ = set $e (print $p "RAG__RETRIEVAL_TARGET") (include "ledgerlens-service.grpcAddress" (dict "root" .root "name" "retrieval" "svc" $r)) -}}
{{- /* its own token for that call: client credentials (in a Secret) traded here */ -}}
{{- $i := $v.services.identity -}}
{{- $_ = set $e (print $p "SERVICE_TOKEN_URL") (printf "http://%s-identity.%s.svc:%d/oauth/token" .root.Release.Name .root.Release.Namespace (int $i.httpPort)) -}}
{{- end -}}
{{- /* providers and router from the mounted gateway ConfigMap (keys stay in Secrets) */ -}}
{{- if .svc.gatewayConfig -}}
{{- $_ = set $e (print $p "PROVIDERS_FILE") (include "ledgerlens-service.gatewayConfigFile" .) -}}
{{- end -}}
{{- range $k, $val := .svc.env -}}
{{- $_ = set $e $k (toString $val) -}}
{{- end -}}
{{- toYaml $e -}}
{{- end -}}

{{/*
Settings that differ per pod, from the downward API (a ConfigMap is the same for all):
retrieval's replica name when it may run more than one pod, since each replica keeps a
whole index and so needs durable consumers of its own (retrieval-<pod>--…).
*/}}
{{- define "ledgerlens-service.podEnv" -}}
{{- if and (eq .name "retrieval") (include "ledgerlens-service.multiReplica" .) -}}
env:
  - name: {{ include "ledgerlens-service.envPrefix" . }}REPLICA
    valueFrom:
      fieldRef:
        fieldPath: metadata.name
{{- end -}}
{{- end -}}

{{- define "ledgerlens-service.secretEnv" -}}
{{- $p := include "ledgerlens-service.envPrefix" . -}}
{{- $v := .root.Values -}}
{{- $u := include "ledgerlens-service.uses" . | fromYaml -}}
{{- $e := dict -}}
{{- $pg := $v.externalPostgresql -}}
{{- if $pg.enabled -}}
{{- if not $pg.existingSecret -}}
{{- $db := get $pg.databases .name | default (printf "ledgerlens_%s" .name) -}}
{{- $_ := set $e (print $p "DATABASE_URL") (printf "postgresql+asyncpg://%s:%s@%s:%d/%s" (urlquery $pg.username) (urlquery $pg.password) $pg.host (int $pg.port) $db) -}}
{{- end -}}
{{- else -}}
{{- $_ := set $e (print $p "DATABASE_URL") (printf "sqlite+aiosqlite:///%s/%s.db" (include "ledgerlens-service.dataDir" .) .name) -}}
{{- end -}}
{{- if and $u.redis (not $v.externalRedis.existingSecret) -}}
{{- $_ := set $e (print $p "REDIS_URL") $v.externalRedis.url -}}
{{- end -}}
{{- if and $u.qdrant $v.externalQdrant.apiKey -}}
{{- $_ := set $e (print $p "QDRANT__API_KEY") $v.externalQdrant.apiKey -}}
{{- end -}}
{{- range $k, $val := .svc.secretEnv -}}
{{- $_ := set $e $k (toString $val) -}}
{{- end -}}
{{- toYaml $e -}}
{{- end -}}

{{/* Secrets the platform team manages, read with envFrom (keys are env names too). */}}
{{- define "ledgerlens-service.externalSecrets" -}}
{{- $v := .root.Values -}}
{{- $u := include "ledgerlens-service.uses" . | fromYaml -}}
{{- $names := list -}}
{{- if and $v.externalPostgresql.enabled $v.externalPostgresql.existingSecret -}}
{{- $names = append $names $v.externalPostgresql.existingSecret -}}
{{- end -}}
{{- if and $u.redis $v.externalRedis.existingSecret -}}
{{- $names = append $names $v.externalRedis.existingSecret -}}
{{- end -}}
{{- with .svc.existingSecret -}}
{{- $names = append $names . -}}
{{- end -}}
{{- toYaml (dict "names" ($names | uniq)) -}}
{{- end -}}

{{/* Refuse combinations that would deploy but not work, with the reason. */}}
{{- define "ledgerlens-service.checks" -}}
{{- $p := include "ledgerlens-service.envPrefix" . -}}
{{- $v := .root.Values -}}
{{- $multi := include "ledgerlens-service.multiReplica" . -}}
{{- if and $multi (not $v.externalPostgresql.enabled) -}}
{{- fail (printf "services.%s runs more than one replica: set externalPostgresql.enabled (SQLite on an emptyDir is per pod)" .name) -}}
{{- end -}}
{{- if and (eq .name "retrieval") (eq (.svc.backend | default "local") "qdrant") (not $v.externalQdrant.url) -}}
{{- fail "services.retrieval.backend is qdrant: set externalQdrant.url" -}}
{{- end -}}
{{- if and (eq .name "retrieval") $multi (ne (.svc.backend | default "local") "qdrant") -}}
{{- fail "services.retrieval runs more than one replica: use backend qdrant (the local index lives in one pod)" -}}
{{- end -}}
{{- if and (eq .name "ledger") (eq (.svc.backend | default "dev") "fabric") -}}
{{- range list "FABRIC__PEER_ADDRESS" "FABRIC__MSP_ID" "FABRIC__CERTIFICATE_PATH" "FABRIC__PRIVATE_KEY_PATH" -}}
{{- if not (get $.svc.env (print $p .)) -}}
{{- fail (printf "services.ledger.backend is fabric: set services.ledger.env.%s%s" $p .) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and .svc.existingSecret (eq .svc.existingSecret (include "ledgerlens-service.fullname" .)) -}}
{{- fail (printf "services.%s.existingSecret: %s is the Secret this chart renders for the service; name the platform's Secret otherwise" .name .svc.existingSecret) -}}
{{- end -}}
{{- if and (eq .name "inference") $multi (not $v.externalRedis.enabled) -}}
{{- fail "services.inference runs more than one replica: set externalRedis.enabled (limits, idempotency and the response cache are per pod otherwise)" -}}
{{- end -}}
{{- range (.svc.gatewayConfig | default dict).providers -}}
{{- if hasKey . "api_key" -}}
{{- fail (printf "services.%s.gatewayConfig: provider %s has api_key; the ConfigMap is not secret: name an env var with api_key_env and put the key in services.%s.existingSecret" $.name .name $.name) -}}
{{- end -}}
{{- if and .api_key_env (not $.svc.existingSecret) -}}
{{- fail (printf "services.%s.gatewayConfig: provider %s reads its key from %s: set services.%s.existingSecret to a Secret holding it" $.name .name .api_key_env $.name) -}}
{{- end -}}
{{- end -}}
{{- if and (eq .name "identity") $multi (not (get .svc.env (print $p "KEY_ENCRYPTION_KEY_FILE"))) -}}
{{- fail "services.identity runs more than one replica: every replica needs the same key-encryption key; mount a Secret (secretMounts) and set services.identity.env.LEDGERLENS_IDENTITY_KEY_ENCRYPTION_KEY_FILE" -}}
{{- end -}}
{{- end -}}
