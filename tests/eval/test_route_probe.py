"""The speech route probe: the model's own speech encoder, trained alone, names the request."""
from configs.stages.sft import get_config
from vlacabin_jax.eval import route_probe


def test_speech_encoder_alone_reads_spoken_requests_far_above_chance():
    result = route_probe.speech_probe(get_config("tiny"), steps=400, num_train=4000, num_heldout=600)
    assert result["num_classes"] > 30 and result["heldout_turns"] > 300
    # 400 steps of 64 over 3060 turns with a mel: 0.64 spoken-only measured (445 heldout), chance 0.05.
    assert result["spoken_only_accuracy"] > 0.45 > 5 * result["chance"]
