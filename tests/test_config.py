"""The job file: schema, overrides, and errors that name what is wrong (never a traceback)."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from launcher.config import JobConfig, LohaAdapter, apply_overrides, job_from_dict, load_job
from launcher.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MINIMAL = {"name": "job", "model": {"source": "/models/sd15"},
           "subjects": [{"id": "dog", "images": "/data/dog", "instance_prompt": "a photo of sks dog"}]}


def write(tmp_path, data) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def problems_of(exc: ConfigError) -> str:
    return str(exc)


def test_minimal_job_gets_sane_defaults(tmp_path):
    job = load_job(write(tmp_path, MINIMAL))
    assert job.adapter.type == "lora" and job.adapter.rank == 8 and job.adapter.effective_alpha == 8
    assert job.distributed.strategy == "subject" and job.cluster.backend == "local"
    assert job.train.optimizer == "adamw8bit" and job.output.formats == ["peft", "diffusers", "kohya"]
    assert job.job_uri == "./outputs/job"


def test_unknown_key_lists_the_valid_ones(tmp_path):
    data = {**MINIMAL, "train": {"stepz": 10}}
    with pytest.raises(ConfigError) as err:
        load_job(write(tmp_path, data))
    text = str(err.value)
    assert "train.stepz: unknown key" in text
    assert "steps" in text and "learning_rate" in text


def test_all_errors_reported_at_once_with_dotted_paths(tmp_path):
    data = {**MINIMAL, "adapter": {"type": "lora", "rank": 0}, "train": {"steps": -1, "optimizer": "sgd"}}
    with pytest.raises(ConfigError) as err:
        load_job(write(tmp_path, data))
    text = str(err.value)
    assert "adapter.rank: Input should be greater than 0, got 0" in text
    assert "train.steps" in text and "train.optimizer" in text and "'sgd'" in text


def test_adapter_kind_is_a_discriminated_union(tmp_path):
    data = {**MINIMAL, "adapter": {"type": "loha", "rank": 4, "use_effective_conv2d": True,
                                   "text_encoder": {"type": "lokr", "rank": 2, "decompose_both": True}}}
    job = load_job(write(tmp_path, data))
    assert isinstance(job.adapter, LohaAdapter)
    assert job.adapter.text_encoder.type == "lokr" and job.adapter.text_encoder.decompose_both
    with pytest.raises(ConfigError, match="adapter.decompose_both: unknown key"):
        load_job(write(tmp_path, {**MINIMAL, "adapter": {"type": "lora", "decompose_both": True}}))
    with pytest.raises(ConfigError, match="adapter"):
        load_job(write(tmp_path, {**MINIMAL, "adapter": {"type": "dora"}}))


def test_overrides_follow_the_file(tmp_path):
    job = load_job(write(tmp_path, MINIMAL), ["train.steps=400", "adapter.rank=16", "subjects.0.steps=7",
                                              "train.betas=[0.8, 0.9]", "prior.enabled=false"])
    assert job.train.steps == 400 and job.adapter.rank == 16 and job.subjects[0].steps == 7
    assert job.train.betas == (0.8, 0.9)


@pytest.mark.parametrize("override, message", [
    ("train.steps", "must look like KEY=VALUE"),
    ("=3", "must look like KEY=VALUE"),
    ("second-job.yaml", r"one job file per command"),
    ("subjects.5.steps=3", "is not an index"),
    ("train.steps.x=3", "train.steps: Input should be a valid integer"),
    ("train.nope=3", "train.nope: unknown key"),
])
def test_bad_overrides_say_what_is_wrong(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_job(write(tmp_path, MINIMAL), [override])


@pytest.mark.parametrize("text, message", [
    ("name: [unclosed", "not valid YAML at line"),
    ("", "is empty"),
    ("- a\n- b\n", "top level must be a mapping"),
    ("name: x\n", "model: required"),
])
def test_malformed_files(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_job(write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_job(tmp_path / "nope.yaml")


@pytest.mark.parametrize("bad_id", ["..", "a/b", "has space", "tab\tid", "new\nline", "-lead", "é", "x" * 200, ""])
def test_hostile_subject_ids_are_rejected(tmp_path, bad_id):
    data = {**MINIMAL, "subjects": [{"id": bad_id, "images": "/d", "instance_prompt": "p"}]}
    with pytest.raises(ConfigError, match="subjects.0.id"):
        load_job(write(tmp_path, data))


def test_duplicate_ids_and_missing_class_prompts(tmp_path):
    subject = {"id": "dog", "images": "/d", "instance_prompt": "p"}
    with pytest.raises(ConfigError, match="duplicate subject ids: dog"):
        load_job(write(tmp_path, {**MINIMAL, "subjects": [subject, subject]}))
    with pytest.raises(ConfigError, match="needs a class_prompt.*dog"):
        load_job(write(tmp_path, {**MINIMAL, "prior": {"enabled": True}}))


def test_job_name_must_be_dns_safe(tmp_path):
    with pytest.raises(ConfigError, match="name:"):
        load_job(write(tmp_path, {**MINIMAL, "name": "My_Job"}))


def test_every_field_has_a_description():
    seen, todo = set(), [JobConfig]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        for name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{name} has no description"
            for arg in _classes_in(field.annotation):
                todo.append(arg)
    assert len(seen) > 10


def _classes_in(annotation):
    from typing import get_args

    from pydantic import BaseModel

    stack, out = [annotation], []
    while stack:
        a = stack.pop()
        if isinstance(a, type) and issubclass(a, BaseModel):
            out.append(a)
        stack.extend(get_args(a))
    return out


# ------------------------------------------------------------------ property tests

yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False),
                         st.text(string.printable, max_size=12))
yaml_values = st.recursive(yaml_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                 st.dictionaries(st.text(string.ascii_lowercase + "_.", max_size=10), inner, max_size=3)),
                           max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(section=st.sampled_from(["model", "adapter", "train", "prior", "subjects", "output", "distributed", "cluster", "name"]),
       value=yaml_values)
def test_any_value_in_any_section_gives_a_config_or_a_config_error(section, value):
    data = {**MINIMAL, section: value}
    try:
        job_from_dict(data)
    except ConfigError as exc:
        assert exc.problems or exc.message
        assert "Traceback" not in str(exc)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(string.printable, max_size=200))
def test_arbitrary_text_never_raises_anything_but_config_error(tmp_path, text):
    try:
        load_job(write(tmp_path, text))
    except ConfigError:
        pass


@settings(max_examples=100, deadline=None)
@given(key=st.text(string.ascii_lowercase + "._0123456789", min_size=1, max_size=20), value=yaml_values)
def test_arbitrary_overrides_never_raise_anything_but_config_error(key, value):
    try:
        data = apply_overrides(yaml.safe_load(yaml.safe_dump(MINIMAL)), [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}"])
        job_from_dict(data)
    except ConfigError:
        pass


@pytest.mark.parametrize("adapter, key, valid, invalid", [
    ({"type": "lora"}, "bogus", "dropout", "decompose_both"),
    ({"type": "loha"}, "dropout", "rank_dropout", "decompose_both"),
    ({"type": "lokr"}, "bogus", "decompose_factor", "bias"),
])
def test_unknown_adapter_key_lists_the_keys_of_that_adapter_type(tmp_path, adapter, key, valid, invalid):
    with pytest.raises(ConfigError) as err:
        load_job(write(tmp_path, {**MINIMAL, "adapter": {**adapter, key: 1}}))
    line = next(p for p in err.value.problems if p.startswith(f"adapter.{key}: unknown key"))
    assert valid in line and invalid not in line, line


@pytest.mark.parametrize("manifest, text", [
    ("subjects.jsonl", '{"id": "a", "images": "/x", "instance_prompt": "p", "class_prompt": "c"}\n'
                       '{"id": "b", "images": "/x", "instance_prompt": "p"}\n'),
    ("subjects.csv", "id,images,instance_prompt,class_prompt\na,/x,p,c\nb,/x,p,\n"),
])
def test_prior_preservation_needs_class_prompts_in_a_manifest_too(tmp_path, manifest, text):
    from launcher.subjects import resolve_subjects

    (tmp_path / manifest).write_text(text)
    job = load_job(write(tmp_path, {**MINIMAL, "subjects": str(tmp_path / manifest), "prior": {"enabled": True}}))
    with pytest.raises(ConfigError, match="needs a class_prompt for every subject; missing for: b$"):
        resolve_subjects(job)


@pytest.mark.parametrize("override, message", [
    (r'name="job\n"', "name: 'job\\n' must be lowercase"),
    (r'subjects.0.id="dog\n"', "subjects.0.id: 'dog\\n' is not a safe subject id"),
    (r'cluster.slurm.partition="gpu\ntouch /tmp/x"', "cluster.slurm.partition: 'gpu\\ntouch /tmp/x' must be one line"),
    (r'cluster.slurm.extra=["--qos=a\nrm -rf /"]', "cluster.slurm.extra: '--qos=a\\nrm -rf /' must be one line"),
    ("cluster.slurm.time=banana", "cluster.slurm.time: 'banana' is not a Slurm time limit"),
    ('cluster.env={"A;touch /tmp/x;B": "1"}', "cluster.env: 'A;touch /tmp/x;B' is not an environment variable name"),
    ('cluster.env={"AWS_SECRET_ACCESS_KEY": "x"}', "cluster.env.AWS_SECRET_ACCESS_KEY: holds a credential"),
    ('cluster.env={"HF_TOKEN": "x"}', "cluster.env.HF_TOKEN: holds a credential"),
    ("output.uri=s3://AKIA:hunter2@bucket/out", "output.uri: holds a credential"),
    ("output.uri=", "output.uri: must not be empty"),
    ("output.uri=s3://", "output.uri: 's3://' names no bucket or host"),
    ("model.source=s3:/models/sd", "model.source: 's3:/models/sd' is neither a path nor a URI"),
    ("subjects=gs:/x.jsonl", "subjects: 'gs:/x.jsonl' is neither a path nor a URI"),
    ('subjects.0.images=["/ok.png", "s3://u:p@b/x.png"]', "subjects.0.images.1: holds a credential"),
    ("train.learning_rate=.inf", "train.learning_rate: Input should be a finite number"),
    ("cluster.kubernetes.namespace=Team_A", "cluster.kubernetes.namespace: 'Team_A' is not a namespace name"),
    ("cluster.kubernetes.memory=lots", "cluster.kubernetes.memory: 'lots' is not a Kubernetes quantity"),
    ("train.steps=true", "train: steps must be a number, not true"),
    ("train.pack=false", "train: pack must be a number, not false"),
    ("subjects.0.learning_rate=true", "subjects.0: learning_rate must be a number, not true"),
])
def test_hostile_or_malformed_values_are_refused(tmp_path, override, message):
    with pytest.raises(ConfigError) as err:
        load_job(write(tmp_path, MINIMAL), [override])
    assert [p for p in err.value.problems if p.startswith(message)], err.value.problems
    assert "hunter2" not in str(err.value)


@pytest.mark.parametrize("time", ["30", "30:00", "04:00:00", "2-00", "2-12:00", "1-00:00:00", "UNLIMITED"])
def test_slurm_time_limits_in_every_form_slurm_takes(tmp_path, time):
    assert load_job(write(tmp_path, MINIMAL), [f"cluster.slurm.time={time!r}"]).cluster.slurm.time == time


def test_redact_drops_user_info_and_query_strings():
    from launcher.storage import redact

    assert redact("s3://AKIA:hunter2@bucket/x?X-Amz-Signature=abc") == "s3://bucket/x?..."
    assert redact("cannot read https://h/a.jsonl?sig=S3cret: 403 Forbidden") == "cannot read https://h/a.jsonl?... 403 Forbidden"
    assert redact("./outputs/job") == "./outputs/job"


def test_a_storage_scheme_that_cannot_be_used_is_a_message(monkeypatch):
    import fsspec

    from launcher import storage
    from launcher.errors import StorageError

    with pytest.raises(StorageError, match="cannot use xyz://bucket/s.jsonl: ValueError: Protocol not known: xyz"):
        storage.exists("xyz://bucket/s.jsonl")

    def missing_package(*args, **kwargs):
        raise ImportError("Please install gcsfs to access Google Storage")

    monkeypatch.setattr(fsspec.core, "url_to_fs", missing_package)  # as fsspec answers without gcsfs
    with pytest.raises(StorageError, match=r"gs://bucket/s.jsonl: Please install gcsfs .*dreamfleet\[gcs\]"):
        storage.exists("gs://bucket/s.jsonl")


SECRET = "Zm9vYmFyQmF6cXV4MTIzNDU2Nzg5MGFiY2RlZmdoaWprbG1ub3BxcnN0dXZ3eHl6QUJDREVGR0g="
PLANTED_CREDENTIALS = [
    ({"cluster": {"env": {"AZURE_STORAGE_KEY": SECRET}}}, "cluster.env.AZURE_STORAGE_KEY"),
    ({"cluster": {"env": {"AZURE_STORAGE_CONNECTION_STRING": "DefaultEndpointsProtocol=https;AccountName=acct;"
                                                             f"AccountKey={SECRET};EndpointSuffix=core.windows.net"}}},
     "cluster.env.AZURE_STORAGE_CONNECTION_STRING"),
    ({"cluster": {"env": {"DB_PASS": "s3cr3tPassw0rd"}}}, "cluster.env.DB_PASS"),
    ({"output": {"uri": "s3://ASIAQWERTYTOKEN42@bucket/out"}}, "output.uri"),
    ({"model": {"source": "s3://ASIAQWERTYTOKEN42@models/sd15"}}, "model.source"),
    ({"prior": {"store": "gs://ASIAQWERTYTOKEN42@priors/x"}}, "prior.store"),
    ({"subjects": [{"id": "dog", "images": ["/ok.png", "s3://ASIAQWERTYTOKEN42@b/x.png"], "instance_prompt": "p"}]},
     "subjects.0.images.1"),
    ({"output": {"uri": "https://host/out?secret_key=s3cr3tPassw0rd"}}, "output.uri"),
    ({"model": {"source": "https://b.s3.amazonaws.com/sd?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature=9f8e7d6c5b4a"}},
     "model.source"),
    ({"output": {"uri": "https://acct.blob.core.windows.net/c/out?sv=2022-11-02&sp=rw&sig=s3cr3tPassw0rd%3D"}}, "output.uri"),
    ({"prior": {"store": "https://storage.googleapis.com/b/p?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Signature=9f8e7d6c"}},
     "prior.store"),
    ({"cluster": {"slurm": {"extra": ["--reservation=r", f"--export=ALL,AWS_SECRET_ACCESS_KEY={SECRET}"]}}},
     "cluster.slurm.extra.1"),
    ({"subjects": [{"id": "dog", "images": "/d", "instance_prompt": "p"},
                   {"id": "cat", "images": "/d", "instance_prompt": "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIx"
                                                                    "MjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"}]},
     "subjects.1.instance_prompt"),
    ({"cluster": {"kubernetes": {"node_selector": {"pool": "AKIAIOSFODNN7EXAMPLQ"}}}}, "cluster.kubernetes.node_selector.pool"),
]


def _merged(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@pytest.mark.parametrize("extra, path", PLANTED_CREDENTIALS, ids=[p for _, p in PLANTED_CREDENTIALS])
def test_a_credential_anywhere_in_the_job_is_refused_by_path_without_its_value(tmp_path, extra, path):
    with pytest.raises(ConfigError) as err:
        load_job(write(tmp_path, _merged(MINIMAL, extra)))
    line = next((p for p in err.value.problems if p.startswith(f"{path}: holds a credential")), None)
    assert line, err.value.problems
    assert "cluster.kubernetes.credentials_secret" in line and "environment" in line
    for value in (SECRET, "s3cr3tPassw0rd", "ASIAQWERTYTOKEN42", "9f8e7d6c", "dozjgNry", "AKIAIOSFODNN7EXAMPLQ"):
        assert value not in str(err.value)


def test_references_to_credentials_and_long_ids_are_not_credentials(tmp_path):
    job = load_job(write(tmp_path, _merged(MINIMAL, {
        "model": {"source": "s3://models/sd15", "revision": "0123456789abcdef0123456789abcdef01234567"},
        "cluster": {"env": {"HF_HOME": "/scratch/hf", "GIT_SHA": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b",
                            "AWS_DEFAULT_REGION": "eu-west-1"},
                    "kubernetes": {"credentials_secret": "bucket-credentials", "service_account": "trainer"}},
        "subjects": [{"id": "c0ffee0123456789abcdef0123456789", "images": "s3://bucket/u/c0ffee0123456789abcdef/",
                      "instance_prompt": "a photo of sks dog, password-style collar, token of love"}]})))
    assert job.cluster.kubernetes.credentials_secret == "bucket-credentials"


def test_default_sample_prompt_reads_right_with_an_instance_prompt(tmp_path):
    job = load_job(write(tmp_path, MINIMAL))
    filled = [p.replace("{instance}", job.subjects[0].instance_prompt) for p in job.train.samples.prompts]
    assert filled == ["a photo of sks dog in a garden"]


@pytest.mark.parametrize("text, message", [
    ("name: job\nmodel:\n  source: /m\ntrain:\n  steps: 10\n  steps: 20\n", ":6: key 'steps' appears twice in one mapping, at lines 5 and 6"),
    ("name: job\nmodel: {source: /m, source: /n}\n", ":2: key 'source' appears twice in one mapping, at lines 2 and 2"),
    ("name: job\nname: other\nmodel: {source: /m}\n", ":2: key 'name' appears twice in one mapping, at lines 1 and 2"),
])
def test_a_duplicate_key_is_refused_with_both_lines(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_job(path)
    assert str(err.value) == f"job file {path}{message}"


def test_a_tab_indented_file_is_named_as_such_with_its_line(tmp_path):
    path = write(tmp_path, "name: job\nmodel:\n  source: /m\ntrain:\n\tsteps: 10\n")
    with pytest.raises(ConfigError, match=rf"^job file {path}:5: indented with a tab; YAML indents with spaces only"):
        load_job(path)


@pytest.mark.parametrize("image", ["dreamfleet:latest", "registry.example.com:5000/team/dreamfleet:1.2",
                                   "localhost/debian-base:bookworm", "nvcr.io/nvidia/pytorch:24.05-py3",
                                   "dreamfleet@sha256:" + "a" * 64, "docker://ghcr.io/team/df:1",
                                   "nvcr.io#nvidia/pytorch:24.05-py3", "/shared/images/dreamfleet.sif"])
def test_image_references_in_the_forms_runtimes_take_are_accepted(tmp_path, image):
    assert load_job(write(tmp_path, MINIMAL), [f"cluster.image={image}"]).cluster.image == image


@pytest.mark.parametrize("image", ["df:1$(touch x)", "df;rm -rf /", "Team/DF:1", "df:", "a//b", "-df", "df:1 --privileged",
                                   "df@sha256:short", "registry.example.com:port/df"])
def test_a_malformed_image_reference_is_refused(tmp_path, image):
    with pytest.raises(ConfigError) as err:
        load_job(write(tmp_path, MINIMAL), [f"cluster.image={image!r}"])
    assert [p for p in err.value.problems if p.startswith(f"cluster.image: {image!r} is not a container image reference")], \
        err.value.problems


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_shipped_sample_prompts_read_right_with_the_instance_prompts(example):
    job = load_job(EXAMPLES / example)
    subjects = job.subjects if isinstance(job.subjects, list) else []
    for s in subjects:
        for prompt in job.train.samples.prompts:
            filled = prompt.replace("{instance}", s.instance_prompt)
            assert "a photo of a photo" not in filled and filled.count("{") == 0, filled


def test_a_fleet_on_a_store_without_exclusive_create_is_refused():
    """Claims need an exclusive create (launcher.storage): two workers on a store without one could
    both win a subject; one worker alone never races."""
    from launcher.config import JobConfig
    from launcher.validate import unsupported

    job = {"name": "x", "model": {"source": "/m"}, "output": {"uri": "ftp://host/out"},
           "subjects": [{"id": "a", "images": "/x", "instance_prompt": "p"}]}
    assert unsupported(JobConfig.model_validate(job)) == []
    fleet = JobConfig.model_validate({**job, "distributed": {"nproc_per_node": 2}})
    assert [p for p in unsupported(fleet) if p.startswith("output.uri: ")] == [
        "output.uri: output ftp://host/out: ftp:// has no exclusive create, which the claims of 2 workers need; "
        "use a local or shared path, s3://, gs:// or az://, or one worker"]
    for uri in ("s3://b/out", "gs://b/out", "az://c/out", "/shared/out"):
        assert unsupported(JobConfig.model_validate({**job, "output": {"uri": uri}, "distributed": {"nproc_per_node": 2}})) == []
