#!/usr/bin/env bash
# `make demo`: the whole Portcullis story on this machine, narrated. Needs root (network
# namespaces, nftables) and nftables, iproute2, openssh-server, openssh-client.
#
#   1. `portcullis dev` brings up a local control plane with the operator;
#   2. a "vm" network namespace (198.18.0.10, a real sshd) and a "laptop" namespace with
#      two addresses (198.19.0.10, the one examples/jitrequest.yaml asks for, and
#      198.19.0.11), joined by a veth pair;
#   3. `portcullis agent` enforces examples/nsg.yaml for the vm;
#   4. SSH is refused, a JitRequest opens it for 198.19.0.10 only, and it closes at expiry.
#
# Everything it creates is removed on exit, also on Ctrl-C or failure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VM_NS=pcdemo-vm
LAPTOP_NS=pcdemo-laptop
VM_IP=198.18.0.10
GRANTED=198.19.0.10
OTHER=198.19.0.11
DURATION=PT20S

bold=$'\e[1m' dim=$'\e[2m' green=$'\e[32m' red=$'\e[31m' reset=$'\e[0m'
[[ -t 1 ]] || bold='' dim='' green='' red='' reset=''
say() { printf '\n%s==> %s%s\n' "$bold" "$*" "$reset"; }
show() { printf '%s$ %s%s\n' "$dim" "$*" "$reset"; "$@"; }
die() { printf '%sdemo: %s%s\n' "$red" "$*" "$reset" >&2; exit 1; }

[[ $EUID -eq 0 ]] || die "run as root: network namespaces and nftables need it"
for tool in ip nft /usr/sbin/sshd ssh ssh-keygen; do
  command -v "$tool" >/dev/null || die "$tool is missing: apt-get install nftables iproute2 openssh-server openssh-client"
done
if ip netns list | grep -qE "^($VM_NS|$LAPTOP_NS)\b"; then
  die "namespaces $VM_NS/$LAPTOP_NS exist already (another demo running?); remove them with: ip netns del $VM_NS; ip netns del $LAPTOP_NS"
fi

say "Building portcullis"
cargo build --quiet --locked --bin portcullis
BIN=$PWD/target/debug/portcullis
WORK=$(mktemp -d)
PIDS=()

cleanup() {
  set +e
  say "Cleaning up: agent, sshd, operator and control plane, namespaces"
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
  ip netns del "$VM_NS" 2>/dev/null
  ip netns del "$LAPTOP_NS" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

say "Starting the operator on a local control plane (portcullis dev)"
# Always the local plane: a configured cluster is hidden from `portcullis dev`.
DEV_ENV=(env -u KUBECONFIG)
if [[ -e $HOME/.kube/config ]]; then
  mkdir -p "$WORK/home"
  DEV_ENV+=(HOME="$WORK/home" PORTCULLIS_CACHE_DIR="${PORTCULLIS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/portcullis}")
fi
"${DEV_ENV[@]}" "$BIN" dev >"$WORK/dev.out" 2>"$WORK/dev.log" &
PIDS+=($!)
for _ in $(seq 1 1200); do
  grep -q '^export KUBECONFIG=' "$WORK/dev.out" && break
  kill -0 "${PIDS[0]}" 2>/dev/null || { cat "$WORK/dev.log" >&2; die "portcullis dev stopped"; }
  sleep 0.5
done
line=$(grep '^export KUBECONFIG=' "$WORK/dev.out") || die "portcullis dev did not become ready"
export KUBECONFIG=${line#export KUBECONFIG=}
KUBECTL="$(hack/control-plane-bins.sh 2>/dev/null)/kubectl"
[[ -x $KUBECTL ]] || KUBECTL=kubectl
kubectl() { "$KUBECTL" "$@"; }
echo "${green}operator ready${reset}; KUBECONFIG=$KUBECONFIG"

say "Making the machine ($VM_NS, $VM_IP) and the laptop ($LAPTOP_NS, $GRANTED and $OTHER)"
show ip netns add "$VM_NS"
show ip netns add "$LAPTOP_NS"
ip -n "$VM_NS" link add eth0 type veth peer name eth0 netns "$LAPTOP_NS"
for ns in "$VM_NS" "$LAPTOP_NS"; do
  ip -n "$ns" link set lo up
  ip -n "$ns" link set eth0 up
done
ip -n "$VM_NS" addr add "$VM_IP/32" dev eth0
ip -n "$VM_NS" route add 198.19.0.0/16 dev eth0
ip -n "$LAPTOP_NS" addr add "$GRANTED/32" dev eth0
ip -n "$LAPTOP_NS" addr add "$OTHER/32" dev eth0
ip -n "$LAPTOP_NS" route add "$VM_IP/32" dev eth0

say "Starting a real OpenSSH server on $VM_IP:22"
mkdir -p /run/sshd
ssh-keygen -q -t ed25519 -N '' -f "$WORK/host_key"
ssh-keygen -q -t ed25519 -N '' -f "$WORK/laptop_key"
cp "$WORK/laptop_key.pub" "$WORK/authorized_keys"
cat >"$WORK/sshd_config" <<EOF
Port 22
ListenAddress $VM_IP
HostKey $WORK/host_key
AuthorizedKeysFile $WORK/authorized_keys
PidFile none
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
LogLevel ERROR
EOF
ip netns exec "$VM_NS" /usr/sbin/sshd -D -e -f "$WORK/sshd_config" 2>"$WORK/sshd.log" &
PIDS+=($!)

ssh_from() {
  ip netns exec "$LAPTOP_NS" ssh -i "$WORK/laptop_key" -o BatchMode=yes \
    -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o ConnectTimeout=2 \
    -o LogLevel=ERROR -b "$1" "root@$VM_IP" 'echo "logged in to $(hostname) as $(whoami)"'
}
try_ssh() {
  printf '%s$ ssh -b %s root@%s%s\n' "$dim" "$1" "$VM_IP" "$reset"
  if ssh_from "$1"; then
    echo "${green}ssh from $1: accepted${reset}"
    return 0
  fi
  echo "${red}ssh from $1: no connection (dropped)${reset}"
  return 1
}
for _ in $(seq 1 50); do ssh_from "$GRANTED" >/dev/null 2>&1 && break; sleep 0.2; done
echo "No firewall yet: anyone gets in."
try_ssh "$GRANTED" || die "sshd is not reachable"

say "Applying examples/nsg.yaml and examples/jitpolicy.yaml"
show kubectl apply -f examples/nsg.yaml -f examples/jitpolicy.yaml

say "Starting the agent for default/web-nsg on $VM_IP"
"$BIN" agent --nsg default/web-nsg --address "$VM_IP" --agent-name web-1 --netns "$VM_NS" \
  2>"$WORK/agent.log" &
PIDS+=($!)
for _ in $(seq 1 100); do
  kubectl get agentreport web-nsg.web-1 -o jsonpath='{.spec.rulesHash}' 2>/dev/null |
    grep -qv '^none$\|^$' && break
  sleep 0.2
done
show kubectl get agentreports
echo "The agent's table (nft list table inet portcullis, abridged):"
ip netns exec "$VM_NS" nft list chain inet portcullis input | sed -n '1,40p'

say "SSH is closed: the JIT policy's deny rule covers port 22"
try_ssh "$GRANTED" && die "ssh should be closed"
try_ssh "$OTHER" && die "ssh should be closed"

say "Requesting access from $GRANTED for $DURATION (examples/jitrequest.yaml, shortened from PT5M)"
sed "s/duration: PT5M/duration: $DURATION/" examples/jitrequest.yaml | show kubectl apply -f -
show kubectl wait jitrequest/ssh-web-1 --for=jsonpath='{.status.phase}'=Granted --timeout=60s
show kubectl get jitrequest ssh-web-1
echo "The grant is an element with a kernel timeout, not a rule:"
ip netns exec "$VM_NS" nft list set inet portcullis jit_allow_v4 | grep -A3 elements || true

say "SSH from the granted source gets in; the other source still does not"
for _ in $(seq 1 50); do ssh_from "$GRANTED" >/dev/null 2>&1 && break; sleep 0.2; done
try_ssh "$GRANTED" || die "ssh from $GRANTED should be open"
try_ssh "$OTHER" && die "ssh from $OTHER should stay closed"

say "Waiting for the grant to expire"
show kubectl wait jitrequest/ssh-web-1 --for=jsonpath='{.status.phase}'=Expired --timeout=120s
for _ in $(seq 1 20); do ssh_from "$GRANTED" >/dev/null 2>&1 || break; sleep 0.2; done
try_ssh "$GRANTED" && die "ssh should be closed after expiry"

say "Done: refused, granted to one source only, refused again after expiry."
