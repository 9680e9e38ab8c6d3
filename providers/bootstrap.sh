# The body of an instance's startup script. providers/bootstrap.py prepends the
# settings (LAUNCH_ID, IMAGE, ENGINE_ARGV, CALLBACK_URL, ...) as shell assignments.
#
# Steps: check the NVIDIA driver against the CUDA pin, start watching for a spot
# interruption notice (spot instances only), fetch this replica's secrets from the
# controller, pull the engine image, start the engine container, wait for its health
# path, run the engine's warm-up (ollama pulls its model), report ready. Any failure is
# reported as failed with a reason, and the script exits non-zero instead of serving.
# Secrets never reach the log, the report or the command line of this script.

# shellcheck shell=bash
# shellcheck disable=SC2154  # the settings are defined by the rendered header
set -euo pipefail
umask 077

mkdir -p "$STATE_DIR"
ENV_FILE="$STATE_DIR/engine-$LAUNCH_ID.env"
AUTH_HEADER="$STATE_DIR/callback-$LAUNCH_ID.header"
printf 'Authorization: Bearer %s\n' "$CALLBACK_TOKEN" >"$AUTH_HEADER"

log() {
  printf '[autoscaler-boot %s] %s\n' "$LAUNCH_ID" "$*" >&2
}

json_string() {
  local text=$1
  text=${text//\\/\\\\}
  text=${text//\"/\\\"}
  text=${text//$'\n'/ }
  text=${text//$'\t'/ }
  printf '"%s"' "$text"
}

report() {
  local state=$1 reason=${2:-}
  local body
  body="{\"launch_id\":$(json_string "$LAUNCH_ID"),\"state\":$(json_string "$state"),\"reason\":$(json_string "$reason")}"
  curl -fsS --retry 5 --retry-delay 2 -X POST \
    -H "@$AUTH_HEADER" -H 'Content-Type: application/json' \
    --data "$body" "$CALLBACK_URL/status" >/dev/null
}

fail() {
  log "failed: $1"
  report failed "$1" || log "could not report the failure to the controller"
  exit 1
}

# sort -V orders version strings numerically field by field ("535.104.05" < "550.54.14").
version_lt() {
  [[ "$1" != "$2" && "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -n1)" == "$1" ]]
}

check_driver() {
  command -v nvidia-smi >/dev/null || fail "no NVIDIA driver: nvidia-smi is not installed"
  local driver
  driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1) ||
    fail "nvidia-smi cannot read the driver version (no GPU visible?)"
  driver=${driver//[[:space:]]/}
  [[ -n "$driver" ]] || fail "nvidia-smi reported no GPU"
  log "NVIDIA driver $driver"
  if [[ -n "$MIN_DRIVER" ]] && version_lt "$driver" "$MIN_DRIVER"; then
    fail "NVIDIA driver $driver is older than $MIN_DRIVER, which CUDA $CUDA_VERSION needs"
  fi
}

fetch_secrets() {
  curl -fsS --retry 5 --retry-delay 2 -H "@$AUTH_HEADER" -o "$ENV_FILE" "$CALLBACK_URL/secrets" ||
    fail "could not fetch this replica's secrets from the controller"
  local name value line
  for name in "${SECRET_NAMES[@]}"; do
    value=""
    while IFS= read -r line || [[ -n "$line" ]]; do
      if [[ "$line" == "$name="* ]]; then value=${line#"$name="}; fi
    done <"$ENV_FILE"
    local ref="\${$name}" i
    for i in "${!ENGINE_ARGV[@]}"; do
      if [[ "${ENGINE_ARGV[$i]}" == *"$ref"* ]]; then
        [[ -n "$value" ]] || fail "the controller sent no value for secret $name"
        ENGINE_ARGV[i]=${ENGINE_ARGV[$i]//"$ref"/"$value"}
      fi
    done
  done
}

pull_image() {
  local attempt
  for attempt in 1 2 3; do
    if docker pull "$IMAGE" >/dev/null; then return 0; fi
    log "pulling $IMAGE failed (attempt $attempt)"
    sleep "$POLL_SECONDS"
  done
  fail "pulling image $IMAGE failed 3 times"
}

start_engine() {
  docker rm -f "$CONTAINER_NAME" >/dev/null 2>&1 || true
  mkdir -p "$CACHE_DIR"
  local env_args=() pair
  for pair in "${ENGINE_ENV[@]}"; do env_args+=(-e "$pair"); done
  local net_args=(-p "$ENGINE_PORT:$ENGINE_PORT") run_args=(--entrypoint "${ENGINE_ARGV[0]}" "$IMAGE" "${ENGINE_ARGV[@]:1}")
  if [[ -n "$GROUP_ROLE" ]]; then
    # A group's members talk to each other over the host's network.
    net_args=(--network host)
  fi
  if [[ "$GROUP_ROLE" == leader && "$GROUP_MODE" == ray ]]; then
    # A Ray group's leader: a Ray head, then, once every member has joined it, the
    # engine over the Ray cluster.
    # shellcheck disable=SC2016  # expanded by the container's bash, not here
    run_args=(--entrypoint bash "$IMAGE" -c 'ray start --head --port="$0" && until [ "$(ray status 2>/dev/null | grep -c node_)" -ge "$1" ]; do sleep 5; done; shift; exec "$@"' "$RAY_PORT" "$GROUP_SIZE" "${ENGINE_ARGV[@]}")
  fi
  docker run -d --name "$CONTAINER_NAME" \
    --gpus all --ipc=host --restart unless-stopped \
    "${net_args[@]}" \
    -v "$CACHE_DIR:$CACHE_MOUNT" \
    --env-file "$ENV_FILE" "${env_args[@]}" \
    --label "autoscaler.launch-id=$LAUNCH_ID" \
    "${run_args[@]}" >/dev/null ||
    fail "docker could not start the engine container from $IMAGE"
}

# A group's member learns its leader's address from the controller's boot callback
# (GET {url}/group), once the leader's machine is launched.
leader_address() {
  local answer
  answer=$(curl -fsS --max-time 5 -H "@$AUTH_HEADER" "$CALLBACK_URL/group" 2>/dev/null) || return 1
  [[ "$answer" =~ \"leader_address\":\ ?\"([^\"]+)\" ]] || return 1
  printf '%s' "${BASH_REMATCH[1]}"
}

LEADER_ADDRESS=""
await_leader() {
  local waited=0
  until LEADER_ADDRESS=$(leader_address); do
    if ((waited >= HEALTH_TIMEOUT_SECONDS)); then
      fail "the group's leader address did not come within ${HEALTH_TIMEOUT_SECONDS}s"
    fi
    sleep "$POLL_SECONDS"
    waited=$((waited + (POLL_SECONDS > 0 ? POLL_SECONDS : 1)))
  done
}

# Every member of an each-member group (SGLang) runs the engine with the leader's
# address in place of ${GROUP_LEADER_ADDRESS} (--dist-init-addr).
fill_leader_address() {
  await_leader
  log "the group's leader is at $LEADER_ADDRESS"
  local ref="\${GROUP_LEADER_ADDRESS}" i
  for i in "${!ENGINE_ARGV[@]}"; do
    ENGINE_ARGV[i]=${ENGINE_ARGV[$i]//"$ref"/"$LEADER_ADDRESS"}
  done
}

join_leader() {
  await_leader
  local address=$LEADER_ADDRESS
  log "joining the group's leader at $address"
  docker rm -f "$CONTAINER_NAME" >/dev/null 2>&1 || true
  mkdir -p "$CACHE_DIR"
  docker run -d --name "$CONTAINER_NAME" \
    --gpus all --ipc=host --restart unless-stopped --network host \
    -v "$CACHE_DIR:$CACHE_MOUNT" \
    --env-file "$ENV_FILE" \
    --label "autoscaler.launch-id=$LAUNCH_ID" \
    --entrypoint ray "$IMAGE" start --block "--address=$address:$RAY_PORT" >/dev/null ||
    fail "docker could not start the Ray worker container from $IMAGE"
}

wait_healthy() {
  local url="http://127.0.0.1:$ENGINE_PORT$HEALTH_PATH" waited=0 status
  until curl -fsS -o /dev/null --max-time 5 "$url"; do
    status=$(docker inspect -f '{{.State.Status}}' "$CONTAINER_NAME" 2>/dev/null || echo missing)
    if [[ "$status" == "exited" || "$status" == "dead" || "$status" == "missing" ]]; then
      fail "the engine container stopped ($status) before $HEALTH_PATH answered"
    fi
    if ((waited >= HEALTH_TIMEOUT_SECONDS)); then
      fail "the engine did not answer $HEALTH_PATH within ${HEALTH_TIMEOUT_SECONDS}s"
    fi
    sleep "$POLL_SECONDS"
    waited=$((waited + (POLL_SECONDS > 0 ? POLL_SECONDS : 1)))
  done
}

warm_up() {
  if ((${#WARMUP_ARGV[@]})); then
    log "warming up: ${WARMUP_ARGV[*]}"
    docker exec "$CONTAINER_NAME" "${WARMUP_ARGV[@]}" >/dev/null ||
      fail "warm-up '${WARMUP_ARGV[*]}' failed in the engine container"
  fi
}

# The provider's two-minute (EC2) or 30-second (GCE) warning before it reclaims a spot
# instance. The metadata addresses can be replaced from the environment (tests).
EC2_METADATA_URL=${AUTOSCALER_EC2_METADATA_URL:-http://169.254.169.254}
GCE_METADATA_URL=${AUTOSCALER_GCE_METADATA_URL:-http://metadata.google.internal}

ec2_notice() {
  local token
  token=$(curl -fsS --max-time 2 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 300' \
    "$EC2_METADATA_URL/latest/api/token" 2>/dev/null) || return 1
  # 404 until EC2 schedules the interruption; then {"action": ..., "time": ...}.
  curl -fsS --max-time 2 -H "X-aws-ec2-metadata-token: $token" \
    "$EC2_METADATA_URL/latest/meta-data/spot/instance-action" 2>/dev/null
}

gce_notice() {
  local preempted
  preempted=$(curl -fsS --max-time 2 -H 'Metadata-Flavor: Google' \
    "$GCE_METADATA_URL/computeMetadata/v1/instance/preempted" 2>/dev/null) || return 1
  [[ "$preempted" == "TRUE" ]] && printf 'instance/preempted is TRUE'
}

watch_spot_notice() {
  local notice
  while true; do
    notice=""
    case "$SPOT_NOTICE" in
      ec2) notice=$(ec2_notice) || notice="" ;;
      gce) notice=$(gce_notice) || notice="" ;;
    esac
    if [[ -n "$notice" ]]; then
      log "spot interruption notice: $notice"
      if report interrupted "$SPOT_NOTICE spot interruption notice: $notice"; then
        return 0
      fi
      log "could not report the interruption notice; trying again"
    fi
    sleep "$POLL_SECONDS"
  done
}

start_spot_watch() {
  [[ -n "$SPOT_NOTICE" ]] || return 0
  # Outlives this script: the notice can come at any time while the instance serves.
  watch_spot_notice </dev/null >>"$STATE_DIR/spot-notice-$LAUNCH_ID.log" 2>&1 &
  echo $! >"$STATE_DIR/spot-notice-$LAUNCH_ID.pid"
  disown
  log "watching for $SPOT_NOTICE spot interruption notices"
}

check_driver
start_spot_watch
fetch_secrets
pull_image
if [[ -n "$GROUP_ROLE" && "$GROUP_MODE" == each-member ]]; then
  fill_leader_address
fi
if [[ "$GROUP_ROLE" == worker ]]; then
  if [[ "$GROUP_MODE" == each-member ]]; then
    start_engine # serves nothing: the leader's engine answers once every member joined
    log "started the engine as a worker of the group's leader at $LEADER_ADDRESS"
  else
    join_leader
    log "joined the group's leader as a Ray worker"
  fi
  report ready "" || { log "could not report ready to the controller"; exit 1; }
  exit 0
fi
start_engine
wait_healthy
warm_up
report ready "" || { log "could not report ready to the controller"; exit 1; }
log "ready on port $ENGINE_PORT"
