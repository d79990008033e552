"""Generated wire contract (proto/batchferry/v1). Regenerate with scripts/gen_proto.py."""
