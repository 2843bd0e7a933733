#!/bin/bash
# Validates install/*.yaml against the Kubernetes API schemas (strict: unknown
# fields are errors) with kubernetes-validate, for the oldest and newest
# Kubernetes versions we support, and proves the check can fail: each broken
# copy of the manifest below must be rejected.
#
# Usage: tests/manifests.sh VALIDATOR   (make validate-manifests passes it)
set -uo pipefail

validator=${1:?usage: tests/manifests.sh PATH/TO/kubernetes-validate}
cd "$(dirname "$0")/.."
manifest=install/calico-ipsec.yaml
versions=(1.29.0 1.37.0)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
passed=0
failed=0

ok() { echo "ok: $*"; passed=$((passed + 1)); }
fail() { echo "FAILED: $*"; failed=$((failed + 1)); }

echo "validator: $("$validator" --version 2>&1)"
for v in "${versions[@]}"; do
	for f in install/*.yaml; do
		if out=$("$validator" --strict --quiet -k "$v" "$f" 2>&1); then
			ok "$f is valid for Kubernetes $v"
		else
			fail "$f for Kubernetes $v: $out"
		fi
	done
done

# Each broken manifest must be rejected: a misspelt field, a wrong type, a
# required field missing, an unknown top-level field, a bad enum-like value.
broken=(
	's/hostNetwork: true/hostNetwrok: true/'
	's/replicas: 2/replicas: two/'
	'/^      containers:/,/^        - name: agent/s/containers:/containerz:/'
	's/^kind: DaemonSet/kind: DaemonSet\nbogus: 1/'
	's/containerPort: 9094/containerPort: "metrics-port"/'
)
for i in "${!broken[@]}"; do
	edit=${broken[$i]}
	sed "$edit" "$manifest" >"$tmp/broken-$i.yaml"
	if cmp -s "$manifest" "$tmp/broken-$i.yaml"; then
		fail "the edit '$edit' changed nothing; the negative case is void"
	elif out=$("$validator" --strict --quiet -k "${versions[-1]}" "$tmp/broken-$i.yaml" 2>&1); then
		fail "a broken manifest ($edit) was accepted"
	else
		ok "a broken manifest ($edit) is rejected: $(grep -m1 -o 'against version.*' <<<"$out")"
	fi
done

# The probes ask the endpoints that tell the truth: /livez for liveness,
# /readyz for readiness, on both the agent and the manager.
for probe in livenessProbe:/livez readinessProbe:/readyz; do
	n=$(grep -A2 -E "^ *${probe%%:*}:" "$manifest" | grep -c "path: ${probe#*:}\$")
	if [ "$n" -eq 2 ]; then
		ok "the agent's and the manager's ${probe%%:*} ask ${probe#*:}"
	else
		fail "expected 2 ${probe%%:*} on ${probe#*:}, found $n"
	fi
done

echo "manifests: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
