{{/*
Named templates. The public ones, for your own pod specs, are
"zk-cache-sidecar.container" and "zk-cache-sidecar.volumes": both take this
chart's context (from a parent chart: index .Subcharts "zk-cache-sidecar").
*/}}

{{- define "zk-cache-sidecar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "zk-cache-sidecar.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "zk-cache-sidecar.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "zk-cache-sidecar.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Room is left for "-headless" and a pod ordinal within 63 characters. */}}
{{- define "zk-cache-sidecar.zookeeper.fullname" -}}
{{- printf "%s-zk" (include "zk-cache-sidecar.fullname" .) | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{- define "zk-cache-sidecar.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "zk-cache-sidecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "zk-cache-sidecar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "zk-cache-sidecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "zk-cache-sidecar.image" -}}
{{- $image := .Values.image -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository (default .Chart.AppVersion $image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
A size as the daemon and Kubernetes write it ("64Mi", "64MiB", "1G",
"1048576") in bytes. Units are case-insensitive as in the daemon: k/m/g/t
are powers of 1000, ki/mi/gi/ti powers of 1024; a trailing "b" is ignored.
*/}}
{{- define "zk-cache-sidecar.bytes" -}}
{{- $text := . | toString | trim | lower -}}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" $text -}}
{{- $unit := trimSuffix "b" (trimPrefix $number $text) -}}
{{- $units := dict "" 1.0 "k" 1e3 "ki" 1024.0 "m" 1e6 "mi" 1048576.0 "g" 1e9 "gi" 1073741824.0 "t" 1e12 "ti" 1099511627776.0 -}}
{{- if or (not $number) (not (hasKey $units $unit)) -}}
{{- fail (printf "zk-cache-sidecar: %q is not a size (use e.g. 64Mi, 256MiB, 1G)" (toString .)) -}}
{{- end -}}
{{- mulf (float64 $number) (get $units $unit) | int64 -}}
{{- end -}}

{{/* A duration as the daemon writes it ("10s", "250ms", "1.5", "2m") in seconds. */}}
{{- define "zk-cache-sidecar.seconds" -}}
{{- $text := . | toString | trim | lower -}}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" $text -}}
{{- $unit := trimPrefix $number $text -}}
{{- $units := dict "" 1.0 "s" 1.0 "ms" 0.001 "m" 60.0 "h" 3600.0 "d" 86400.0 -}}
{{- if or (not $number) (not (hasKey $units $unit)) -}}
{{- fail (printf "zk-cache-sidecar: %q is not a duration (use e.g. 10s, 250ms)" (toString .)) -}}
{{- end -}}
{{- mulf (float64 $number) (get $units $unit) -}}
{{- end -}}

{{/*
A setting's value as text for ZKCACHE_*: YAML numbers reach templates as
float64, and 1000000 would otherwise print as 1e+06.
*/}}
{{- define "zk-cache-sidecar.text" -}}
{{- if and (kindIs "float64" .) (eq (float64 (int64 .)) .) -}}
{{- int64 . -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end -}}

{{- define "zk-cache-sidecar.zkConnect" -}}
{{- if .Values.zookeeper.enabled -}}
{{- $name := include "zk-cache-sidecar.zookeeper.fullname" . -}}
{{- $hosts := list -}}
{{- range $i := until (int .Values.zookeeper.replicas) -}}
{{- $hosts = append $hosts (printf "%s-%d.%s-headless.%s.svc.%s:2181" $name $i $name $.Release.Namespace $.Values.clusterDomain) -}}
{{- end -}}
{{- join "," $hosts -}}
{{- else -}}
{{- required "zk-cache-sidecar: set externalZookeeper.connect (host:port,...) or zookeeper.enabled=true" .Values.externalZookeeper.connect -}}
{{- end -}}
{{- end -}}

{{/*
Refuse to render settings that cannot work: a cache that does not fit its
container, or a stop bound the kubelet would cut short. max_bytes charges
each entry for what it costs in memory (bench.memory: the accounting came to
0.91-0.95 of the measured RSS growth), so 1.25 x max_bytes leaves room for
the rest and for allocator slack; 64Mi is the idle process (Python,
aiohttp, kazoo: about 50 MB measured).
*/}}
{{- define "zk-cache-sidecar.checks" -}}
{{- $sidecar := .Values.sidecar -}}
{{- if eq (int $sidecar.port) (int $sidecar.opsPort) -}}
{{- fail (printf "zk-cache-sidecar: sidecar.port and sidecar.opsPort are both %v; the API and the probe port need their own" $sidecar.port) -}}
{{- end -}}
{{- $limit := dig "limits" "memory" "" $sidecar.resources -}}
{{- if $limit -}}
{{- $cache := include "zk-cache-sidecar.bytes" $sidecar.config.max_bytes | int64 -}}
{{- $needed := add (div (mul 5 $cache) 4) 67108864 -}}
{{- $have := include "zk-cache-sidecar.bytes" $limit | int64 -}}
{{- if lt $have $needed -}}
{{- fail (printf "zk-cache-sidecar: sidecar.config.max_bytes=%v needs a memory limit of at least %dMi (1.25 x max_bytes + 64Mi); sidecar.resources.limits.memory is %v" $sidecar.config.max_bytes (div $needed 1048576) $limit) -}}
{{- end -}}
{{- end -}}
{{- $stop := include "zk-cache-sidecar.seconds" $sidecar.config.shutdown_timeout | float64 -}}
{{- if ge $stop (float64 $sidecar.terminationGracePeriodSeconds) -}}
{{- fail (printf "zk-cache-sidecar: sidecar.config.shutdown_timeout=%v must be below sidecar.terminationGracePeriodSeconds=%v, or the kubelet kills the sidecar mid-stop" $sidecar.config.shutdown_timeout $sidecar.terminationGracePeriodSeconds) -}}
{{- end -}}
{{- if $sidecar.zkTls.enabled -}}
{{- if not $sidecar.zkTls.secretName -}}
{{- fail "zk-cache-sidecar: sidecar.zkTls.enabled needs sidecar.zkTls.secretName (a Secret with the CA, and the client certificate and key)" -}}
{{- end -}}
{{- if .Values.zookeeper.enabled -}}
{{- fail "zk-cache-sidecar: sidecar.zkTls.enabled needs externalZookeeper with a secure client port; the bundled ensemble has none" -}}
{{- end -}}
{{- if and $sidecar.zkTls.certKey (not $sidecar.zkTls.keyKey) -}}
{{- fail "zk-cache-sidecar: sidecar.zkTls.certKey needs sidecar.zkTls.keyKey" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "zk-cache-sidecar.securityContext" -}}
{{- toYaml .Values.sidecar.securityContext -}}
{{- end -}}

{{/*
The sidecar container. Put it under initContainers when sidecar.native
(Kubernetes 1.29+: restartPolicy Always makes it a native sidecar), else under
containers. Pair it with "zk-cache-sidecar.volumes".
*/}}
{{- define "zk-cache-sidecar.container" -}}
{{- include "zk-cache-sidecar.checks" . -}}
{{- $sidecar := .Values.sidecar -}}
name: {{ $sidecar.containerName }}
image: {{ include "zk-cache-sidecar.image" . }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
{{- if $sidecar.native }}
restartPolicy: Always
{{- end }}
ports:
  - name: zkcache-ops
    containerPort: {{ $sidecar.opsPort }}
    protocol: TCP
env:
  - name: ZKCACHE_ZK
    value: {{ include "zk-cache-sidecar.zkConnect" . | quote }}
  - name: ZKCACHE_LISTEN
    value: {{ printf "127.0.0.1:%v" $sidecar.port | quote }}
  - name: ZKCACHE_OPS_LISTEN
    value: {{ printf "0.0.0.0:%v" $sidecar.opsPort | quote }}
  - name: ZKCACHE_MEMBER_ID
    valueFrom:
      fieldRef:
        fieldPath: metadata.name
  {{- range $name, $value := $sidecar.config }}
  {{- if not (and (eq $name "origin") $sidecar.originSecret.name) }}
  - name: {{ printf "ZKCACHE_%s" (upper $name) }}
    value: {{ include "zk-cache-sidecar.text" $value | quote }}
  {{- end }}
  {{- end }}
  {{- with $sidecar.originSecret.name }}
  - name: ZKCACHE_ORIGIN
    valueFrom:
      secretKeyRef:
        name: {{ . }}
        key: {{ $sidecar.originSecret.key }}
  {{- end }}
  {{- with $sidecar.zkTls }}
  {{- if .enabled }}
  - name: ZKCACHE_ZK_TLS
    value: "true"
  {{- if .caKey }}
  - name: ZKCACHE_ZK_TLS_CA
    value: {{ printf "/etc/zkcache/zk-tls/%s" .caKey | quote }}
  {{- end }}
  {{- if .certKey }}
  - name: ZKCACHE_ZK_TLS_CERT
    value: {{ printf "/etc/zkcache/zk-tls/%s" .certKey | quote }}
  - name: ZKCACHE_ZK_TLS_KEY
    value: {{ printf "/etc/zkcache/zk-tls/%s" .keyKey | quote }}
  {{- end }}
  - name: ZKCACHE_ZK_TLS_VERIFY
    value: {{ .verify | toString | quote }}
  {{- end }}
  {{- end }}
  {{- with $sidecar.zkAuthSecret.name }}
  - name: ZKCACHE_ZK_AUTH
    valueFrom:
      secretKeyRef:
        name: {{ . }}
        key: {{ $sidecar.zkAuthSecret.key }}
  {{- end }}
  {{- with $sidecar.apiTokenSecret.name }}
  - name: ZKCACHE_AUTH_TOKEN
    valueFrom:
      secretKeyRef:
        name: {{ . }}
        key: {{ $sidecar.apiTokenSecret.key }}
  {{- end }}
  {{- with $sidecar.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
startupProbe:
  httpGet:
    path: /readyz
    port: zkcache-ops
  {{- toYaml $sidecar.probes.startup | nindent 2 }}
readinessProbe:
  httpGet:
    path: {{ $sidecar.probes.readinessPath }}
    port: zkcache-ops
  {{- toYaml $sidecar.probes.readiness | nindent 2 }}
livenessProbe:
  httpGet:
    path: /healthz
    port: zkcache-ops
  {{- toYaml $sidecar.probes.liveness | nindent 2 }}
resources:
  {{- toYaml $sidecar.resources | nindent 2 }}
securityContext:
  {{- include "zk-cache-sidecar.securityContext" . | nindent 2 }}
volumeMounts:
  - name: zkcache-data
    mountPath: /data
  - name: zkcache-tmp
    mountPath: /tmp
  {{- if $sidecar.zkTls.enabled }}
  - name: zkcache-zk-tls
    mountPath: /etc/zkcache/zk-tls
    readOnly: true
  {{- end }}
{{- end -}}

{{/* The volumes the sidecar container mounts (a read-only root needs them). */}}
{{- define "zk-cache-sidecar.volumes" -}}
- name: zkcache-data
  emptyDir:
    sizeLimit: {{ .Values.sidecar.dataVolume.sizeLimit }}
- name: zkcache-tmp
  emptyDir:
    sizeLimit: 64Mi
{{- with .Values.sidecar.zkTls }}
{{- if .enabled }}
- name: zkcache-zk-tls
  secret:
    secretName: {{ .secretName }}
    items:
      {{- if .caKey }}
      - key: {{ .caKey }}
        path: {{ .caKey }}
      {{- end }}
      {{- if .certKey }}
      - key: {{ .certKey }}
        path: {{ .certKey }}
      - key: {{ .keyKey }}
        path: {{ .keyKey }}
      {{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/*
Monitoring (Prometheus Operator). The metrics Service is headless and
publishes NotReady pods: Prometheus must keep scraping a sidecar that lost
ZooKeeper, since that is when ZkCacheNotReady has something to say.
*/}}
{{- define "zk-cache-sidecar.metrics.fullname" -}}
{{- printf "%s-metrics" (include "zk-cache-sidecar.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The pods whose sidecars are scraped: metrics.podSelector, or the example workload's. */}}
{{- define "zk-cache-sidecar.metrics.podSelector" -}}
{{- if .Values.metrics.podSelector -}}
{{- toYaml .Values.metrics.podSelector -}}
{{- else if .Values.example.enabled -}}
{{- include "zk-cache-sidecar.selectorLabels" . }}
app.kubernetes.io/component: example
{{- else -}}
{{- fail "zk-cache-sidecar: metrics.serviceMonitor.enabled needs metrics.podSelector (the labels of your pods that run the sidecar) when example.enabled is false" -}}
{{- end -}}
{{- end -}}

{{/*
PromQL label matchers for this release's series: metrics.prometheusRule.seriesSelector,
or the job (the metrics Service's name) and namespace the ServiceMonitor gives them.
*/}}
{{- define "zk-cache-sidecar.metrics.seriesSelector" -}}
{{- $rule := .Values.metrics.prometheusRule -}}
{{- if $rule.seriesSelector -}}
{{- trim $rule.seriesSelector -}}
{{- else if .Values.metrics.serviceMonitor.enabled -}}
{{- printf "namespace=%q,job=%q" .Release.Namespace (include "zk-cache-sidecar.metrics.fullname" .) -}}
{{- else -}}
{{- fail "zk-cache-sidecar: metrics.prometheusRule.enabled without metrics.serviceMonitor.enabled needs metrics.prometheusRule.seriesSelector (PromQL label matchers of the sidecars' series, e.g. job=\"shop\")" -}}
{{- end -}}
{{- end -}}

{{/* A Prometheus duration ("30s", "1m30s", "250ms") in seconds. */}}
{{- define "zk-cache-sidecar.promSeconds" -}}
{{- $units := dict "ms" 0.001 "s" 1.0 "m" 60.0 "h" 3600.0 "d" 86400.0 "w" 604800.0 "y" 31536000.0 -}}
{{- $total := 0.0 -}}
{{- range regexFindAll "[0-9]+(ms|[smhdwy])" (toString .) -1 -}}
{{- $number := regexFind "^[0-9]+" . -}}
{{- $total = addf $total (mulf (float64 $number) (get $units (trimPrefix $number .))) -}}
{{- end -}}
{{- $total -}}
{{- end -}}

{{- define "zk-cache-sidecar.metrics.checks" -}}
{{- $monitor := .Values.metrics.serviceMonitor -}}
{{- if $monitor.enabled -}}
{{- $interval := include "zk-cache-sidecar.promSeconds" $monitor.interval | float64 -}}
{{- $timeout := include "zk-cache-sidecar.promSeconds" $monitor.scrapeTimeout | float64 -}}
{{- if gt $timeout $interval -}}
{{- fail (printf "zk-cache-sidecar: metrics.serviceMonitor.scrapeTimeout=%v exceeds interval=%v; Prometheus Operator drops such a ServiceMonitor" $monitor.scrapeTimeout $monitor.interval) -}}
{{- end -}}
{{- end -}}
{{- end -}}
