# Source it where TorchServe was started, after `torchserve --start`:
#
#   source scripts/ready.sh encoder encoder/2.0 images
#
# Waits for key_file.json, exports TorchServe's inference key as TOKEN and its management key as
# MTOKEN, then waits until every named model (NAME or NAME/VERSION) has a READY worker, asked of the
# management API at config.properties' management_address ($TS_CONFIG names another config). /ping
# is no readiness signal: it says Healthy while the workers are still loading the model. Gives up
# after 120 s per wait, naming where to look.
_ready_config=${TS_CONFIG:-config.properties}
_ready_management=$(sed -n 's/^management_address=//p' "$_ready_config")
_ready_python=${PYTHON:-.venv/bin/python}
if ! timeout 120 bash -c 'until [ -s key_file.json ]; do sleep 0.5; done'; then
  echo "ready.sh: no key_file.json here after 120 s: is TorchServe running from this directory?" >&2
  return 1
fi
TOKEN=$("$_ready_python" -c 'import json; print(json.load(open("key_file.json"))["inference"]["key"])')
MTOKEN=$("$_ready_python" -c 'import json; print(json.load(open("key_file.json"))["management"]["key"])')
export TOKEN MTOKEN
for _ready_model in "$@"; do
  if ! timeout 120 bash -c "until curl -s -H 'Authorization: Bearer $MTOKEN' '$_ready_management/models/$_ready_model' \
      | grep -Eq '\"status\": *\"READY\"'; do sleep 0.5; done"; then
    echo "ready.sh: $_ready_model has no READY worker after 120 s: see logs/model_log.log" >&2
    return 1
  fi
done
unset _ready_config _ready_management _ready_python _ready_model
