"""Resource requests of the stages and the check that they can be placed, before any work: on node
shapes given in the config, and against a real local Ray."""

import pytest

from pipeline.config import NodeShape, parse_job_config
from pipeline.run.job_stages import stage_requests
from pipeline.run.resources import (
    ANSWER_BASE_MEMORY_GIB,
    GIB,
    HUB_MODEL_MEMORY_GIB,
    ClusterGPUs,
    UnschedulableError,
    check_placement,
    checkpoint_bytes,
    nodes_from_ray,
    nodes_from_shapes,
)
from pipeline.run.runner import run_job


def job(tmp_path, **sections):
    data = {"input": {"videos": str(tmp_path / "*.mp4")}, "questions": {"prompts": ["Describe it."]},
            "output": {"path": str(tmp_path / "out")}}
    for section, values in sections.items():
        data[section] = values
    return parse_job_config(data)


def requests(tmp_path, gpus_usable=True, cluster_gpus=0.0, **sections):
    return stage_requests(job(tmp_path, **sections), ClusterGPUs(usable=gpus_usable, total=cluster_gpus))


def place(reqs, *shapes):
    requests = list(reqs.values())
    check_placement(requests, nodes_from_shapes([NodeShape(**s) for s in shapes], requests), "ray.node_shapes")


GPU_NODE = {"cpus": 8, "gpus": 1, "memory_gib": 64}


def test_one_gpu_holds_a_clip_share_and_a_vlm_share(tmp_path):
    reqs = requests(tmp_path, guidance={"num_gpus": 0.2}, answer={"num_gpus": 0.8, "memory_gib": 20})
    place(reqs, {**GPU_NODE, "max_nodes": 1})
    # 1.25 GPUs on one: the VLM actor is placed first (largest), the CLIP actor finds no room
    with pytest.raises(UnschedulableError, match=r"^guidance: 1 actor of .*beside .*answer x1.*short of GPU"):
        place(requests(tmp_path, guidance={"num_gpus": 0.25}, answer={"num_gpus": 1, "memory_gib": 20}),
              {**GPU_NODE, "max_nodes": 1})


def test_a_request_larger_than_any_node_names_stage_and_resource(tmp_path):
    with pytest.raises(UnschedulableError, match=r"^answer: each actor .*memory \(needs 100.0 GiB, has 64.0 GiB\)"):
        place(requests(tmp_path, answer={"memory_gib": 100}), GPU_NODE)
    with pytest.raises(UnschedulableError, match=r"^guidance: each actor .*CPU \(needs 16"):
        place(requests(tmp_path, guidance={"num_cpus": 16}), GPU_NODE)
    with pytest.raises(UnschedulableError, match=r"^decode: each task .*CPU \(needs 12"):
        place(requests(tmp_path, decode={"num_cpus": 12}), GPU_NODE)
    with pytest.raises(UnschedulableError, match=r"^answer: num_gpus 1.5 above 1 must be a whole number"):
        place(requests(tmp_path, answer={"num_gpus": 1.5}), GPU_NODE)


def test_fractional_gpus_are_placed_within_one_gpu(tmp_path):
    reqs = requests(tmp_path, guidance={"num_gpus": 0.6}, answer={"num_gpus": 0.6, "concurrency": 2, "memory_gib": 1})
    two_gpus = {"cpus": 16, "gpus": 2, "memory_gib": 128, "max_nodes": 1}
    with pytest.raises(UnschedulableError, match=r"^(answer|guidance): .*short of GPU"):
        place(reqs, two_gpus)  # 1.8 GPUs in all, but no GPU holds two 0.6 shares
    place(reqs, {**two_gpus, "gpus": 3})


def test_actors_must_leave_room_for_decode_tasks(tmp_path):
    reqs = requests(tmp_path, guidance={"num_cpus": 4, "num_gpus": 0.2},
                    answer={"num_cpus": 4, "num_gpus": 0.8, "memory_gib": 8})
    with pytest.raises(UnschedulableError, match=r"^decode: .*the pipeline would stall"):
        place(reqs, {**GPU_NODE, "max_nodes": 1})
    place(reqs, GPU_NODE)  # an autoscaler may add a second node for the decode tasks
    place(reqs, {**GPU_NODE, "max_nodes": 1}, {"cpus": 2, "memory_gib": 8})  # or a CPU node


def test_answer_concurrency_auto_is_one_actor_per_gpu_share(tmp_path):
    auto = {"concurrency": "auto"}
    no_clip_gpu = {"num_gpus": 0}
    assert requests(tmp_path, cluster_gpus=2, answer=auto, guidance=no_clip_gpu)["answer"].count == 2
    # the CLIP actor's share comes first: 0.25 of 2 GPUs leaves room for one whole-GPU actor
    whole_gpu = requests(tmp_path, cluster_gpus=2, answer={**auto, "num_gpus": 1}, guidance={"num_gpus": 0.25})
    assert whole_gpu["answer"].count == 1
    beside_clip = requests(tmp_path, cluster_gpus=2, answer={**auto, "num_gpus": 0.8}, guidance={"num_gpus": 0.2})
    assert beside_clip["answer"].count == 2
    place(beside_clip, {"cpus": 8, "gpus": 2, "memory_gib": 128, "max_nodes": 1})
    half_gpu = requests(tmp_path, cluster_gpus=8, answer={**auto, "num_gpus": 0.5}, guidance=no_clip_gpu)
    assert half_gpu["answer"].count == 16
    assert requests(tmp_path, cluster_gpus=0, answer=auto)["answer"].count == 1
    cpu_only = requests(tmp_path, gpus_usable=False, cluster_gpus=0, answer=auto)["answer"]
    assert (cpu_only.count, cpu_only.gpus) == (1, 0.0)
    assert requests(tmp_path, cluster_gpus=4, answer={"concurrency": 3})["answer"].count == 3


def test_answer_memory_auto_follows_the_checkpoint(tmp_path, tiny_model_dir):
    weights = checkpoint_bytes(tiny_model_dir["llava"])
    assert weights and weights > 0
    local = requests(tmp_path, answer={"model": tiny_model_dir["llava"]})["answer"]
    assert local.memory_bytes == int(weights + ANSWER_BASE_MEMORY_GIB * GIB)
    assert requests(tmp_path)["answer"].memory_bytes == int(HUB_MODEL_MEMORY_GIB * GIB)  # a hub id
    assert requests(tmp_path, answer={"memory_gib": 3})["answer"].ray_args()["memory"] == 3 * GIB


def test_a_memory_estimate_names_the_model_it_was_made_for(tmp_path, tiny_model_dir):
    hub = "org/some-video-model"
    with pytest.raises(UnschedulableError) as raised:
        place(requests(tmp_path, answer={"model": hub}), {**GPU_NODE, "memory_gib": 16})
    assert f"{HUB_MODEL_MEMORY_GIB:g} GiB assumed for {hub}, whose weights are not on this machine; " \
           "set answer.memory_gib" in str(raised.value)
    local = requests(tmp_path, answer={"model": tiny_model_dir["llava"]})["answer"].describe()
    assert f"of weights of {tiny_model_dir['llava']} + {ANSWER_BASE_MEMORY_GIB:g} GiB" in local


@pytest.mark.parametrize("answer, message", [
    ({"concurrency": 0}, "answer.concurrency"), ({"concurrency": "many"}, "answer.concurrency"),
    ({"memory_gib": -1}, "answer.memory_gib"),
])
def test_config_rejects_bad_resource_values(tmp_path, answer, message):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        job(tmp_path, answer=answer)


def test_local_ray_nodes_are_read_from_ray(ray_local):
    (node,) = nodes_from_ray(ray_local.nodes())
    assert node.cpus == 4 and node.memory_bytes > 0


@pytest.mark.parametrize("sections, stage, resource", [
    ({"answer": {"num_cpus": 8, "num_gpus": 0}}, "answer", "CPU"),
    ({"answer": {"num_cpus": 0.5, "num_gpus": 0, "memory_gib": 100000}}, "answer", "memory"),
    ({"guidance": {"num_cpus": 2, "num_gpus": 0}, "answer": {"num_cpus": 2, "num_gpus": 0, "memory_gib": 1}},
     "decode", "CPU"),
    ({"ray": {"node_shapes": [{"cpus": 1, "memory_gib": 4}]}}, "answer", "memory"),
])
def test_unschedulable_jobs_fail_before_any_work(tmp_path, ray_local, sections, stage, resource):
    (tmp_path / "a.mp4").write_bytes(b"never decoded")
    cfg = job(tmp_path, **sections)
    with pytest.raises(UnschedulableError, match=rf"^{stage}: .*{resource}"):
        run_job(cfg)
    assert not (tmp_path / "out" / "answers").exists() and not (tmp_path / "out" / "frames").exists()


def test_clip_in_the_answer_actor_asks_for_no_clip_actors(tmp_path):
    """guidance.placement answer_actor: the whole GPU goes to one actor per GPU, which also holds
    CLIP's host memory; the 0.25 + 1.0 split that cannot fit one GPU is not asked for."""
    reqs = requests(tmp_path, cluster_gpus=2.0,
                    guidance={"num_gpus": 0.25, "memory_gib": 3, "placement": "answer_actor"},
                    answer={"num_gpus": 1, "memory_gib": 20, "concurrency": "auto"})
    assert "guidance" not in reqs  # no CLIP actors
    assert reqs["answer"].count == 2 and reqs["answer"].gpus == 1
    assert reqs["answer"].memory_bytes == 23 * GIB
    place(reqs, {**GPU_NODE, "gpus": 2, "max_nodes": 1})
    with pytest.raises(UnschedulableError, match=r"^answer: 3 actors .*short of GPU"):
        place(requests(tmp_path, guidance={"placement": "answer_actor"},
                       answer={"num_gpus": 1, "memory_gib": 20, "concurrency": 3}),
              {**GPU_NODE, "gpus": 2, "max_nodes": 1})


def test_the_default_shares_fill_one_gpu(tmp_path):
    """Out of the box a one-GPU node holds the CLIP actor and one Video-LLM actor; `auto` puts
    one Video-LLM actor on each GPU of a larger node beside the one CLIP actor."""
    reqs = requests(tmp_path, cluster_gpus=1.0, answer={"memory_gib": 20})
    assert (reqs["guidance"].gpus, reqs["answer"].gpus) == (0.2, 0.8)
    place(reqs, {**GPU_NODE, "max_nodes": 1})
    reqs = requests(tmp_path, cluster_gpus=4.0, answer={"memory_gib": 20, "concurrency": "auto"})
    assert reqs["answer"].count == 4
    place(reqs, {**GPU_NODE, "gpus": 4, "memory_gib": 128, "max_nodes": 1})


def test_gpu_decoding_asks_for_a_gpu_share_beside_the_actors(tmp_path):
    nvdec = {"backend": "nvdec", "num_gpus": 0.05}
    full = requests(tmp_path, decode=nvdec, guidance={"num_gpus": 0.2}, answer={"num_gpus": 0.8, "memory_gib": 8})
    assert full["decode"].ray_args()["num_gpus"] == 0.05
    with pytest.raises(UnschedulableError, match=r"^decode: a task asks for CPU 1, GPU 0.05.*short of GPU"):
        place(full, {**GPU_NODE, "max_nodes": 1})  # CLIP and the Video-LLM already fill the one GPU
    place(requests(tmp_path, decode=nvdec, guidance={"num_gpus": 0.2}, answer={"num_gpus": 0.7, "memory_gib": 8}),
          {**GPU_NODE, "max_nodes": 1})
    # a local Ray without GPUs: the share drops, the tasks run (and nvdec falls back to PyAV)
    assert requests(tmp_path, gpus_usable=False, decode=nvdec)["decode"].gpus == 0


def test_nvdec_without_a_gpu_share_is_refused_naming_the_key(tmp_path):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=r"decode\.num_gpus"):
        job(tmp_path, decode={"backend": "nvdec"})
