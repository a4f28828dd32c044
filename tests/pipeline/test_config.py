import hashlib
import pathlib
import re

import pytest
import yaml

from freemoref.config import MoRefConfig
from pipeline.config import ConfigError, load_job_config, parse_job_config

MINIMAL = {
    "input": {"videos": "videos/*.mp4"},
    "questions": {"prompts": ["Describe the video."]},
    "output": {"path": "out"},
}


def _with(**changes):
    data = {k: dict(v) for k, v in MINIMAL.items()}
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return data


def test_minimal_config_gets_defaults():
    cfg = parse_job_config(MINIMAL)
    assert cfg.input.videos == ["videos/*.mp4"]
    # a plain-string prompt's id comes from its text: an edited prompt is a new question
    text = cfg.questions.prompts[0].question
    assert cfg.questions.prompts[0].question_id == f"prompt-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    edited = parse_job_config({**MINIMAL, "questions": {"prompts": [text + "!"]}})
    assert edited.questions.prompts[0].question_id != cfg.questions.prompts[0].question_id
    assert (cfg.answer.moref.granularity, cfg.answer.moref.fusion_scope) == ("chunk", "question")
    assert cfg.answer.trust_remote_code is False
    assert (cfg.answer.prompt_template, cfg.answer.system_prompt) == ("llava_vid", None)
    assert (cfg.questions.multiple_choice_prompt, cfg.questions.open_ended_prompt) == ("videomme", "none")


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"input__bogus": 1}, "input.bogus: unknown key"),
        ({"decode__num_frames": 0}, "decode.num_frames"),
        ({"decode__backend": "ffmpeg"}, "decode.backend"),
        ({"answer__moref__granularity": "layer"}, "answer.moref.granularity"),
        ({"answer__moref__fusion_scope": "frame"}, "answer.moref.fusion_scope"),
        ({"answer__moref__keep_ratio": 1.5}, "answer.moref.keep_ratio"),
        ({"answer__moref__references": 0}, "answer.moref.references"),
        ({"answer__moref__bogus": 1}, "answer.moref.bogus: unknown key"),
        ({"output__path": None}, "output.path"),
        ({"answer__prompt_template": "vicuna"}, "answer.prompt_template"),
        ({"questions__multiple_choice_prompt": "mmlu"}, "questions.multiple_choice_prompt"),
        ({"nonsense": {}}, "nonsense: unknown key"),
        ({"output__retry_errors": ["read_failed", "timed_out"]}, "output.retry_errors"),
    ],
)
def test_bad_values_fail_naming_the_key(changes, key):
    with pytest.raises(ConfigError) as err:
        parse_job_config(_with(**changes))
    assert key in str(err.value)


def test_moref_keys_validate_into_the_library_config():
    """answer.moref is freemoref's MoRefConfig itself, its YAML values coerced like every other key."""
    cfg = parse_job_config(_with(answer__moref={"references": "3", "keep_ratio": 1, "granularity": "head",
                                                "fusion_scope": "video"}))
    assert cfg.answer.moref == MoRefConfig(references=3, keep_ratio=1.0, granularity="head", fusion_scope="video")
    assert isinstance(cfg.answer.moref.keep_ratio, float)
    assert parse_job_config(MINIMAL).answer.moref == MoRefConfig()


def test_exactly_one_video_source():
    with pytest.raises(ConfigError, match="exactly one of 'videos'"):
        parse_job_config(_with(input__manifest="m.csv"))


def test_yaml_file_relative_paths_and_overrides(tmp_path: pathlib.Path):
    (tmp_path / "job.yaml").write_text(
        "input: {videos: clips/*.mp4}\nquestions: {file: q.jsonl}\noutput: {path: out}\n"
    )
    cfg = load_job_config(tmp_path / "job.yaml", {"decode.num_frames": 8, "answer.moref.enabled": False})
    assert cfg.input.videos == [str(tmp_path / "clips/*.mp4")]
    assert cfg.questions.file == str(tmp_path / "q.jsonl")
    assert cfg.output.path == str(tmp_path / "out")
    assert cfg.decode.num_frames == 8 and cfg.answer.moref.enabled is False


def test_yaml_is_loaded_safely(tmp_path: pathlib.Path):
    (tmp_path / "evil.yaml").write_text("input: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job_config(tmp_path / "evil.yaml")


def test_credentials_are_not_in_repr():
    cfg = parse_job_config(_with(input__storage={"key": "AKIASECRET", "secret": "s3cr3t"}))
    assert "s3cr3t" not in repr(cfg) and "AKIASECRET" not in repr(cfg)
    assert cfg.input.storage.fsspec_options("s3")["secret"] == "s3cr3t"


@pytest.mark.parametrize(
    "path", sorted((pathlib.Path(__file__).resolve().parents[2] / "jobs" / "configs").glob("*.yaml")))
def test_shipped_job_configs_validate(path):
    cfg = load_job_config(path)
    assert cfg.output.path


def test_errors_never_echo_credentials():
    data = _with(input__manifest="m.csv", input__storage={"key": "AKIAEXAMPLEKEY", "secret": "hunter2-secret"})
    with pytest.raises(ConfigError) as err:
        parse_job_config(data)
    assert "hunter2-secret" not in str(err.value) and "AKIAEXAMPLEKEY" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_job_config(_with(output__storage={"secret": 123456789}))
    assert "output.storage.secret" in str(err.value) and "123456789" not in str(err.value)


def test_home_relative_paths_expand(tmp_path: pathlib.Path):
    (tmp_path / "job.yaml").write_text(
        "input: {videos: ~/clips/*.mp4}\nquestions: {prompts: [hi]}\noutput: {path: ~/out}\n")
    cfg = load_job_config(tmp_path / "job.yaml")
    home = pathlib.Path.home()
    assert cfg.input.videos == [str(home / "clips/*.mp4")] and cfg.output.path == str(home / "out")


def test_readme_videomme_commands_validate():
    """docs/EVALUATION.md's Video-MME reproduction overrides the shipped config with keys that exist."""
    repo = pathlib.Path(__file__).resolve().parents[2]
    readme = (repo / "docs" / "EVALUATION.md").read_text()
    section = readme.split("### Reproducing Free-MoRef on Video-MME", 1)[1]
    loop = section.split("for F in 128 256 512; do", 1)[1].split("done", 1)[0]  # the MoRef runs
    pairs = re.findall(r"--set (\S+)", loop.replace("$F", "256"))
    assert len(pairs) == 5
    overrides = {key: yaml.safe_load(value) for key, _, value in (p.partition("=") for p in pairs)}
    cfg = load_job_config(repo / "jobs" / "configs" / "videomme.yaml", overrides)
    assert (cfg.decode.num_frames, cfg.guidance.frames_per_question, cfg.answer.moref.enabled) == (256, 256, True)
    assert cfg.questions.multiple_choice_prompt == "videomme" and cfg.answer.prompt_template == "llava_vid"


def test_frames_decoded_per_question_and_references_resolve_together():
    """One validator relates decode.num_frames, guidance.frames_per_question and the MoRef
    references, says what they resolved to, and fails naming the keys that cannot go together."""
    plan = parse_job_config(_with(decode__num_frames=256, guidance__frames_per_question=128)).frame_plan()
    assert (plan.decoded, plan.per_question, plan.references) == (256, 128, 2)  # ceil(128 / 64)
    assert plan.describe() == "frames: 256 decoded per video, 128 per question, 2 MoRef references"
    # the default frames_per_question (32) is capped at the frames decoded; an explicit one is checked
    assert parse_job_config(_with(decode__num_frames=8)).frame_plan().per_question == 8
    with pytest.raises(ConfigError, match=r"^guidance\.frames_per_question \(64\) exceeds decode\.num_frames \(32\)"):
        parse_job_config(_with(guidance__frames_per_question=64))
    with pytest.raises(ConfigError, match=r"^answer\.moref\.references \(8\) exceeds the 4 frames a question sees"):
        parse_job_config(_with(decode__num_frames=4, answer__moref={"references": 8}))
    native = parse_job_config(_with(answer__moref={"enabled": False})).frame_plan()
    assert native.references == 1 and native.describe().endswith("native attention (1 reference)")
    fps = parse_job_config(_with(decode__sampling="fps", decode__max_frames=64)).frame_plan()
    assert (fps.decoded, fps.decoded_max, fps.references) == (None, 64, None)
    with pytest.raises(ConfigError, match=r"exceeds decode\.max_frames \(64\)"):
        parse_job_config(_with(decode__sampling="fps", decode__max_frames=64, guidance__frames_per_question=65))


def test_generation_keys_come_from_the_engine_options():
    """answer's generation keys are GenerationOptions' fields: same defaults, ranges checked."""
    from freemoref.config import GenerationOptions

    cfg = parse_job_config(_with(answer__max_new_tokens=7, answer__stop_strings=["\n"]))
    assert cfg.answer.generation() == GenerationOptions(max_new_tokens=7, stop_strings=("\n",))
    assert parse_job_config(MINIMAL).answer.generation() == GenerationOptions()
    with pytest.raises(ConfigError, match=r"answer\.top_p: Input should be less than or equal to 1"):
        parse_job_config(_with(answer__top_p=1.5))


def test_readme_own_videos_config_loads_and_names_the_required_keys(tmp_path):
    """README "Your own videos": its YAML loads as written; without any one of the three keys it
    calls required, the config fails naming that key."""
    repo = pathlib.Path(__file__).resolve().parents[2]
    section = (repo / "README.md").read_text().split("## Your own videos", 1)[1]
    text = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    (tmp_path / "my-job.yaml").write_text(text)
    cfg = load_job_config(tmp_path / "my-job.yaml")
    assert cfg.frame_plan().per_question == 128 and cfg.answer.max_new_tokens == 128
    data = yaml.safe_load(text)
    for section_name, key in (("input", "input"), ("questions", "questions"), ("output", "output")):
        partial_cfg = {k: v for k, v in data.items() if k != section_name}
        with pytest.raises(ConfigError, match=rf"{key}: Field required"):
            parse_job_config(partial_cfg)
