{{/* The release's resource name (at most 63 characters). */}}
{{- define "loopd.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "loopd.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "loopd.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "loopd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "loopd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "loopd.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "loopd.configMapName" -}}
{{- default (include "loopd.fullname" .) .Values.existingConfigMap -}}
{{- end -}}

{{/* Where the existingSecret's keys appear as files. */}}
{{- define "loopd.secretsDir" -}}/var/run/secrets/loopd{{- end -}}

{{/* Fail early on combinations the schema cannot express. */}}
{{- define "loopd.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (ne .Values.store.type "postgres") -}}
{{- fail (printf "replicaCount is %d but store.type is %q: several replicas need store.type=postgres (SQLite is single node; see the README's \"Running several replicas\")" (int .Values.replicaCount) .Values.store.type) -}}
{{- end -}}
{{- if and (eq .Values.store.type "postgres") (not .Values.existingSecret) -}}
{{- fail "store.type=postgres needs existingSecret: the Secret holding the DSN under store.postgres.dsnKey (the chart never takes a DSN value)" -}}
{{- end -}}
{{- if and .Values.api.auth.enabled (not .Values.existingSecret) -}}
{{- fail "api.auth.enabled needs existingSecret: the Secret holding each token under its key (the chart never takes a token value)" -}}
{{- end -}}
{{- end -}}

{{/* loopd.yaml, built from values: secrets are file: references into the mounted Secret. */}}
{{- define "loopd.config" -}}
{{- $secrets := include "loopd.secretsDir" . -}}
{{- $cfg := deepCopy (.Values.config | default dict) -}}
{{- $_ := set $cfg "listen" (printf "0.0.0.0:%d" (int .Values.service.port)) -}}
{{- $_ = set $cfg "rules" (list "/etc/loopd/rules") -}}
{{- $packs := list .Values.image.packsDir -}}
{{- if .Values.extraPacks -}}{{- $packs = append $packs "/etc/loopd/packs" -}}{{- end -}}
{{- $_ = set $cfg "packs" $packs -}}
{{- $_ = set $cfg "inventory" "/etc/loopd/inventory.yaml" -}}
{{- if eq .Values.store.type "postgres" -}}
{{- $store := dict "type" "postgres" "dsn" (printf "file:%s/%s" $secrets .Values.store.postgres.dsnKey) "lease" .Values.store.postgres.lease "poll" .Values.store.postgres.poll "pool" .Values.store.postgres.pool -}}
{{- if .Values.store.postgres.listenDsnKey -}}
{{- $_ = set $store "listen_dsn" (printf "file:%s/%s" $secrets .Values.store.postgres.listenDsnKey) -}}
{{- end -}}
{{- $_ = set $cfg "store" $store -}}
{{- else -}}
{{- $_ = set $cfg "store" (dict "path" "/var/lib/loopd/loopd.db") -}}
{{- end -}}
{{- $api := deepCopy (.Values.config.api | default dict) -}}
{{- if .Values.api.auth.enabled -}}
{{- $tokens := list -}}
{{- range .Values.api.auth.tokens -}}
{{- $tokens = append $tokens (dict "name" .name "role" .role "token" (printf "file:%s/%s" $secrets .secretKey)) -}}
{{- end -}}
{{- $_ = set $api "auth" (dict "tokens" $tokens "open" (list "healthz" "readyz" "metrics")) -}}
{{- else -}}
{{- $_ = set $api "auth" "none" -}}
{{- end -}}
{{- $_ = set $cfg "api" $api -}}
{{- if .Values.existingSecret -}}
{{- $sec := deepCopy (.Values.config.secrets | default dict) -}}
{{- $_ = set $sec "dir" $secrets -}}
{{- $_ = set $cfg "secrets" $sec -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}
