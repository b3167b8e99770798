{{- define "sine.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "sine.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "sine.labels" -}}
app.kubernetes.io/name: {{ include "sine.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "sine.selector" -}}
app.kubernetes.io/name: {{ include "sine.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end -}}

{{- define "sine.secretName" -}}
{{- default (include "sine.fullname" .) .Values.existingSecret -}}
{{- end -}}

{{- /* (list image-values tag-suffix root): repository@digest, else repository:tag, where an
empty tag is the chart's appVersion and the suffix (-gpu, -train) */ -}}
{{- define "sine.imageRef" -}}
{{- $img := index . 0 -}}
{{- $suffix := index . 1 -}}
{{- $root := index . 2 -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $img.repository $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository (default (printf "%s%s" $root.Chart.AppVersion $suffix) $img.tag) -}}
{{- end -}}
{{- end -}}

{{- define "sine.image" -}}
{{- if .Values.gpu.enabled -}}
{{- include "sine.imageRef" (list .Values.gpu.image "-gpu" .) -}}
{{- else -}}
{{- include "sine.imageRef" (list .Values.image "" .) -}}
{{- end -}}
{{- end -}}

{{- define "sine.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "sine.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- /* the pod-level fields every pod of the chart's own images shares */ -}}
{{- define "sine.podSpecCommon" -}}
serviceAccountName: {{ include "sine.serviceAccountName" . }}
automountServiceAccountToken: {{ .Values.serviceAccount.automountToken }}
{{- with .Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "sine.redisUrl" -}}
{{- if .Values.redis.internal.enabled -}}
{{- if and (not .Values.redis.password) (not .Values.existingSecret) -}}
{{- fail "redis.internal needs a password: set redis.password, or existingSecret with SINE_REDIS_PASSWORD" -}}
{{- end -}}
{{- printf "redis://%s-redis:6379/0" (include "sine.fullname" .) -}}
{{- else -}}
{{- $url := required "redis.url is required (or set redis.internal.enabled)" .Values.redis.url -}}
{{- if regexMatch "^[a-z]+://[^/@]*:[^/@]*@" $url -}}
{{- fail "redis.url holds a password, which would land in a ConfigMap: give it as redis.password (or in existingSecret) instead" -}}
{{- end -}}
{{- $url -}}
{{- end -}}
{{- end -}}

{{- define "sine.bundlePath" -}}
{{- if .Values.bundle.version -}}
{{- printf "%s/%s" .Values.bundle.mountPath .Values.bundle.version -}}
{{- else -}}
{{- .Values.bundle.mountPath -}}
{{- end -}}
{{- end -}}

{{- define "sine.securityContext" -}}
{{- toYaml .Values.securityContext -}}
{{- end -}}

{{- /*
The salt of the pods' `checksum/secret` annotation: random once, then kept in the Secret's own
annotation (read back with lookup on upgrades), so that anyone who can read pods cannot test
guessed tokens against the annotation offline. Memoized in .Values so that every template of one
render sees the same salt.
*/ -}}
{{- define "sine.checksumSalt" -}}
{{- if not .Values._checksumSalt -}}
{{- $old := lookup "v1" "Secret" .Release.Namespace (include "sine.fullname" .) -}}
{{- $salt := "" -}}
{{- if and $old $old.metadata $old.metadata.annotations -}}
{{- $salt = index $old.metadata.annotations "sine-retrieval/checksum-salt" | default "" -}}
{{- end -}}
{{- $_ := set .Values "_checksumSalt" ($salt | default (randAlphaNum 32)) -}}
{{- end -}}
{{- .Values._checksumSalt -}}
{{- end -}}
