"""The simulated vLLM as a pooling server, as vLLM 0.32 runs one: ``--runner``/``--convert``, what a
pooling runner holds in memory, and the embeddings, score and rerank endpoints (``entrypoints/pooling``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest

from vllm_tuner.serveconfig import ServeConfig
from vllm_tuner.simlite import groundtruth, oracle
from vllm_tuner.simlite.activate import load_scenario_file, resolve
from vllm_tuner.simlite.runner import RunnerError
from vllm_tuner.simlite.runner import resolve as resolve_runner

EMBEDDER = "Qwen/Qwen3-Embedding-4B"
GIB = 1 << 30
BERT = {  # a bidirectional encoder (BAAI/bge-base-en-v1.5's shape)
    "architectures": ["BertModel"],
    "model_type": "bert",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 512,
    "vocab_size": 30522,
}
CROSS_ENCODER = {  # Qwen3-Reranker-0.6B the way vLLM's example loads it (hf_overrides written into the config)
    "architectures": ["Qwen3ForSequenceClassification"],
    "model_type": "qwen3",
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "vocab_size": 151669,
    "tie_word_embeddings": True,
    "classifier_from_token": ["no", "yes"],
    "is_original_qwen3_reranker": True,
}


def model_dir(tmp_path: Path, name: str, config: dict) -> str:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def scenario(name: str = "rtx-4090") -> dict:
    return resolve(load_scenario_file(name))


# ------------------------------------------------------------------------------- --runner and --convert


def test_runner_pooling_is_a_flag_the_simulated_vllm_accepts():
    """``up`` of rag-16gb-phased.yaml died with "unrecognized arguments: --runner pooling"."""
    argv = ["serve", EMBEDDER, "--runner", "pooling", "--max-model-len", "8192", "--max-num-seqs", "4"]
    truth = oracle.truth(scenario(), argv, [0])
    assert truth.boots, truth.category
    assert oracle.truth(scenario(), [*argv, "--convert", "embed"], [0]).boots


def test_runner_and_convert_resolve_as_vllms_model_config_does():
    causal = {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 2560, "model_type": "qwen3"}
    assert resolve_runner(causal).task == "generate"
    embed = resolve_runner(causal, "pooling")
    assert (embed.convert, embed.task, embed.supported_tasks) == ("embed", "embed", ["embed", "token_embed"])
    assert any("`--convert embed`" in line for line in embed.resolved)
    assert resolve_runner(causal, "auto", "classify").kind == "pooling"  # a convert picks the pooling runner
    assert resolve_runner(BERT).task == "embed" and resolve_runner(BERT).encoder_only
    cross = resolve_runner(CROSS_ENCODER)
    assert (cross.task, cross.num_labels, cross.scoring) == ("classify", 1, True)
    two_labels = resolve_runner(causal, "pooling", "classify")  # no label map: transformers' default 2
    assert (two_labels.num_labels, two_labels.scoring) == (2, False)
    with pytest.raises(RunnerError, match=r"Embedding models do not support `--runner generate`"):
        resolve_runner(BERT, "generate")
    with pytest.raises(RunnerError, match=r"does not support `--runner pooling`. You can pass `--convert"):
        resolve_runner(causal, "pooling", "none")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--runner", "pooling", "--convert", "none"], "This model does not support `--runner pooling`"),
        (["--runner", "embed"], "argument --runner: invalid choice: 'embed'"),
    ],
)
def test_a_refused_runner_fails_the_launch_with_vllms_words(sim, tmp_path, capfd, extra, message):
    env = sim("rtx-4090")
    from vllm_tuner.simlite.__main__ import main

    try:
        code = main(["serve", EMBEDDER, *extra])
    except SystemExit as exc:  # argparse's own exit
        code = exc.code
    out = capfd.readouterr()
    assert code in (1, 2) and message in out.out + out.err
    assert env.state_dir.is_dir()


def test_an_encoder_refuses_a_batch_smaller_than_its_context(tmp_path):
    """No chunked prefill for a bidirectional encoder: SchedulerConfig wants a whole prompt per batch."""
    bert = model_dir(tmp_path, "bge", BERT)
    argv = ["serve", bert, "--max-num-batched-tokens", "256"]
    assert oracle.truth(scenario(), argv, [0]).category == oracle.CONFIG_ERROR
    assert oracle.truth(scenario(), ["serve", bert], [0]).boots


# ------------------------------------------------------------------------------------- memory truth


def boot(model_name: str, config: dict, weights: int | None, runner: str, **launch) -> groundtruth.Boot:
    model = groundtruth.model_truth(model_name, config, weights)
    args = groundtruth.LaunchArgs(runner=resolve_runner(config, runner), **launch)
    return groundtruth.boot(model, args, total_bytes=24 * GIB, others_bytes=0, gpu_name="sim", truth={})


def test_a_pooling_runner_holds_no_sampler_logits_and_no_lm_head():
    """vLLM's profile_run warms a pooler, not the sampler (no max_num_seqs x vocab float32 logits), and a
    converted checkpoint is built without its LM head (untied: vocab x hidden fewer bytes)."""
    from vllm_tuner.simlite.server import find_model

    config, weights = find_model("Qwen/Qwen2.5-7B-Instruct-AWQ")
    gen = boot("awq", config, weights, "generate", max_model_len=8192, max_num_seqs=64)
    pool = boot("awq", config, weights, "pooling", max_model_len=8192, max_num_seqs=64)
    assert gen.sampler_bytes == 64 * 152064 * 4
    assert pool.sampler_bytes == 64 * 3584 * 4
    assert gen.weights_bytes - pool.weights_bytes == 152064 * 3584 * 2
    assert pool.kv_bytes_per_token == gen.kv_bytes_per_token  # a causal embedder keeps its KV cache
    assert pool.category == "success" and pool.num_blocks > 0


def test_an_encoder_keeps_no_kv_cache_and_batches_whole_prompts():
    b = boot("bge", BERT, None, "auto", max_num_seqs=32)
    assert b.category == "success"
    assert (b.pool_bytes, b.num_blocks, b.kv_bytes_per_token) == (0, 0, 0)
    assert b.max_num_batched_tokens == 2048  # max(max_model_len 512, the 2048 default)
    long = boot("bge", {**BERT, "max_position_embeddings": 8192}, None, "auto", max_num_seqs=32)
    assert long.max_num_batched_tokens == 8192  # raised to one whole prompt


# ---------------------------------------------------------------------------------------- endpoints


@pytest.fixture
def pooling_server(sim, sim_server, tmp_path):
    def serve(model: str, *extra: str, max_model_len: int = 4096):
        env = sim("rtx-4090", time_scale=1000)
        config = ServeConfig(model, max_model_len=max_model_len, max_num_seqs=8, extra_args=tuple(extra))
        return sim_server(env, config, tmp_path / "server.log")

    return serve


def test_an_embedding_server_answers_embeddings_score_and_rerank_and_refuses_generation(
    pooling_server, tmp_path
):
    with pooling_server(EMBEDDER, "--runner", "pooling") as server:
        url = server.base_url
        one = httpx.post(f"{url}/v1/embeddings", json={"model": EMBEDDER, "input": "the cat sat"}).json()
        assert one["object"] == "list" and one["model"] == EMBEDDER and one["id"].startswith("embd-")
        (item,) = one["data"]
        assert (item["index"], item["object"], len(item["embedding"])) == (0, "embedding", 2560)
        assert math.isclose(math.sqrt(sum(v * v for v in item["embedding"])), 1.0, rel_tol=1e-6)
        assert one["usage"]["prompt_tokens"] == one["usage"]["total_tokens"] > 0
        batch = httpx.post(f"{url}/v1/embeddings", json={"input": ["a b", [101, 102, 103]]}).json()
        assert [d["index"] for d in batch["data"]] == [0, 1]
        as_base64 = httpx.post(
            f"{url}/v1/embeddings", json={"input": "x", "encoding_format": "base64"}
        ).json()
        assert isinstance(as_base64["data"][0]["embedding"], str)

        scored = httpx.post(
            f"{url}/score",
            json={"queries": "where is paris", "documents": ["paris is in france", "fish swim"]},
        ).json()
        assert [d["object"] for d in scored["data"]] == ["score", "score"]
        assert scored["data"][0]["score"] > scored["data"][1]["score"]  # cosine of a bi-encoder
        pairwise = httpx.post(f"{url}/v1/score", json={"data_1": ["a", "b"], "data_2": ["a", "c"]}).json()
        assert len(pairwise["data"]) == 2
        bad = httpx.post(f"{url}/score", json={"queries": ["a", "b"], "documents": ["a", "b", "c"]})
        assert (
            bad.status_code == 400
            and bad.json()["error"]["message"] == "Input lengths must be either 1:1, 1:N or N:N"
        )

        docs = ["fish swim in the sea", "paris is the capital of france", "france borders spain"]
        for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
            ranked = httpx.post(
                f"{url}{path}", json={"query": "capital of france", "documents": docs, "top_n": 2}
            )
            assert ranked.status_code == 200
            results = ranked.json()["results"]
            assert [r["index"] for r in results][:1] == [1] and len(results) == 2
            assert results[0]["document"]["text"] == docs[1]
            assert results[0]["relevance_score"] >= results[1]["relevance_score"]

        for path in ("/v1/completions", "/v1/chat/completions"):  # vLLM registers no generation routes
            refused = httpx.post(f"{url}{path}", json={"prompt": "hi", "messages": []})
            assert (refused.status_code, refused.json()) == (404, {"detail": "Not Found"})
        too_long = httpx.post(f"{url}/v1/embeddings", json={"input": "word " * 5000})
        assert too_long.status_code == 400
        assert "maximum context length is 4096 tokens" in too_long.json()["error"]["message"]
        dims = httpx.post(f"{url}/v1/embeddings", json={"input": "x", "dimensions": 256})
        assert dims.status_code == 400 and "does not support Matryoshka" in dims.json()["error"]["message"]
        assert httpx.get(f"{url}/health").status_code == 200
    log = (tmp_path / "server.log").read_text()
    assert "Supported tasks: ['embed', 'token_embed']" in log
    assert "Resolved `--convert auto` to `--convert embed`" in log


def test_a_cross_encoder_scores_pairs_between_zero_and_one_and_has_no_embeddings(pooling_server, tmp_path):
    reranker = model_dir(tmp_path, "qwen3-reranker", CROSS_ENCODER)
    with pooling_server(reranker) as server:
        url = server.base_url
        ranked = httpx.post(
            f"{url}/rerank",
            json={"query": "capital of france", "documents": ["cats", "the capital of france"]},
        ).json()
        assert [r["index"] for r in ranked["results"]] == [1, 0]
        assert all(0 < r["relevance_score"] < 1 for r in ranked["results"])
        assert httpx.post(f"{url}/v1/embeddings", json={"input": "x"}).status_code == 404
    assert "Supported tasks: ['classify', 'token_classify']" in (tmp_path / "server.log").read_text()


def test_a_generating_server_has_no_pooling_routes(sim, sim_server, tmp_path):
    env = sim("rtx-4090", time_scale=1000)
    with sim_server(env, ServeConfig("qwen2.5-7b", max_model_len=4096), tmp_path / "gen.log") as server:
        for path in ("/v1/embeddings", "/score", "/rerank"):
            assert httpx.post(f"{server.base_url}{path}", json={"input": "x"}).status_code == 404
    assert "Supported tasks: ['generate']" in (tmp_path / "gen.log").read_text()
