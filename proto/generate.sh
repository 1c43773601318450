#!/usr/bin/env bash
# Regenerates fedsms/wire/payload_pb2.py from proto/fedsms/v1/payload.proto.
#
#   proto/generate.sh            # writes fedsms/wire/payload_pb2.py (check the result in)
#   proto/generate.sh OUT.py     # writes OUT.py instead (tests/test_codec.py diffs it)
#
# Needs grpcio-tools (pip install -e '.[test]'); PYTHON picks the interpreter (default:
# python3). The output depends on the grpcio-tools release, so regenerate with the one
# the checked-in file names in its header ("Protobuf Python Version").
#
# The include root is proto/, so the schema registers as "fedsms/v1/payload.proto" in the
# protobuf descriptor pool (its package path, unlikely to clash), and protoc writes
# fedsms/v1/payload_pb2.py under a scratch folder; that file imports no other generated
# module, so it is copied to fedsms/wire/payload_pb2.py and imports as
# fedsms.wire.payload_pb2.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/fedsms/wire/payload_pb2.py}"
python="${PYTHON:-python3}"

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

cd "$root"
"$python" -m grpc_tools.protoc -I proto --python_out="$scratch" proto/fedsms/v1/payload.proto
cp "$scratch/fedsms/v1/payload_pb2.py" "$out"
