"""Span attribute names: the OpenTelemetry GenAI semantic conventions where one applies, and
nextserve's own under the `nextserve.` prefix. One list, read by router, worker, client and the docs.

Future prefix-cache attributes slot in as `gen_ai.usage.cache_read.input_tokens` (the GenAI name
for cached prompt tokens) and `nextserve.cache.*`.
"""

# GenAI semantic conventions (gen_ai.*)
OPERATION_NAME = "gen_ai.operation.name"
REQUEST_MODEL = "gen_ai.request.model"
REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
REQUEST_TEMPERATURE = "gen_ai.request.temperature"
REQUEST_TOP_P = "gen_ai.request.top_p"
REQUEST_TOP_K = "gen_ai.request.top_k"
REQUEST_SEED = "gen_ai.request.seed"
REQUEST_PRESENCE_PENALTY = "gen_ai.request.presence_penalty"
REQUEST_FREQUENCY_PENALTY = "gen_ai.request.frequency_penalty"
REQUEST_STOP_SEQUENCES = "gen_ai.request.stop_sequences"
RESPONSE_ID = "gen_ai.response.id"
RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"

# The operation a Generate call is, in the GenAI vocabulary (a prompt in, a continuation out); the
# HTTP API's chat routes (chat completions, responses) are "chat".
OPERATION_TEXT_COMPLETION = "text_completion"
OPERATION_CHAT = "chat"

# gRPC (rpc.* semantic conventions) on the request span
RPC_GRPC_STATUS_CODE = "rpc.grpc.status_code"
# HTTP (http.* semantic conventions) on the request span of an HTTP API call
HTTP_RESPONSE_STATUS_CODE = "http.response.status_code"

# nextserve's own
SESSION_ID = "nextserve.session_id"
SHARD = "nextserve.shard"                      # worker span: the shard it serves (also a resource attribute)
LAYER = "nextserve.layer"                      # worker span: decoder layer index of the forward
TOKENS = "nextserve.tokens"                    # worker span: token rows computed in the forward
EXPERTS_HIT = "nextserve.experts_hit"          # worker span: distinct experts the forward ran
MERGED_REQUESTS = "nextserve.merged_requests"  # worker span: requests merged into this forward
STEP_SEQUENCES = "nextserve.step.sequences"    # step span: sequences in the forward pass
STEP_TOKENS = "nextserve.step.tokens"          # step span: tokens fed (decodes + prompt chunks)
STEP_PREFILL_TOKENS = "nextserve.step.prefill_tokens"
STEP_SLOWEST_SHARD = "nextserve.step.slowest_shard"  # step span: shard with the largest dispatch time


def shard_dispatch_seconds(shard: int) -> str:
    """Step span: seconds the step waited on this shard, summed over its MoE layers."""
    return f"nextserve.shard.{shard}.dispatch_seconds"


def shard_max_layer_seconds(shard: int) -> str:
    """Step span: the slowest single layer round trip to this shard in the step."""
    return f"nextserve.shard.{shard}.max_layer_seconds"


def shard_tokens(shard: int) -> str:
    """Step span: token rows sent to this shard, summed over its MoE layers."""
    return f"nextserve.shard.{shard}.tokens"
