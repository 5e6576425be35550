#!/usr/bin/env bash
# Deploy infra/prefect.yaml to the Prefect API in PREFECT_API_URL and create (or update) the
# automations of infra/automations.yaml. Run from anywhere; workers of the local pool run the
# code of this checkout (EVOMERGE_REPO, default: this repository).
#   infra/deploy.sh                                         # local pool deployments + automations
#   EVOMERGE_IMAGE=registry.example.org/evomerge:cuda infra/deploy.sh   # ... and evolve-gpu
# evolve-gpu is deployed only with EVOMERGE_IMAGE (an image with evomerge at /opt/evomerge):
# without it the Kubernetes pods would have no image to run.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
BIN=$REPO/.venv/bin
[ -x "$BIN/prefect" ] || BIN=$(dirname "$(command -v prefect)")
export EVOMERGE_REPO=${EVOMERGE_REPO:-$REPO}
names=(--name evolve --name resume --name publish --name publish-run --name demo)
if [ -n "${EVOMERGE_IMAGE:-}" ]; then
  names+=(--name evolve-gpu)
else
  echo "deploy: evolve-gpu skipped (set EVOMERGE_IMAGE to the image with evomerge installed to deploy it)"
fi
cd "$REPO"
"$BIN/prefect" --no-prompt deploy --prefect-file infra/prefect.yaml "${names[@]}"
"$BIN/python" - "$REPO/infra/automations.yaml" <<'PY'
"""Create each automation of the file, replacing one of the same name (idempotent)."""
import sys

import yaml
from prefect import get_client
from prefect.events.schemas.automations import AutomationCore

with get_client(sync_client=True) as client:
    for spec in yaml.safe_load(open(sys.argv[1]))["automations"]:
        automation = AutomationCore.model_validate(spec)
        for old in client.read_automations_by_name(automation.name):
            client.delete_automation(old.id)
        print(f"deploy: automation {automation.name!r} -> {client.create_automation(automation)}")
PY
