"""Generated from proto/dataops/v1 by scripts/gen_proto.py; do not edit."""
