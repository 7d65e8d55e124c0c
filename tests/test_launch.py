"""`ecdit launch`: the generated jobs are valid (bash -n, shellcheck, YAML with the PyTorchJob
fields), the examples in launch/ are what the code writes, bad layouts fail before anything
exists, --dry-run shows what --run runs, and the Dockerfiles pass hadolint."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ecdit_dist.cli import main as ecdit
from ecdit_dist.launch import FORWARDED_SIGNALS, LaunchError, read_hostfile
from ecdit_dist.launch.examples import EXAMPLES, render_example
from workers import ROOT, TINY


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing (pip install -e '.[test]')")
        pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    return path


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_examples_do_not_drift(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = ROOT / "launch" / name
    assert path.read_text() == render_example(name), \
        f"launch/{name} differs from what the code writes; run `python -m ecdit_dist.launch.examples`"


@pytest.mark.parametrize("name", [n for n in EXAMPLES if not n.endswith(".yaml")])
def test_scripts_pass_bash_and_shellcheck(name):
    path = ROOT / "launch" / name
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True, timeout=60).returncode == 0
    out = subprocess.run([tool("shellcheck"), "--severity=style", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout
    text = path.read_text()
    assert f'"--signals-to-handle={FORWARDED_SIGNALS}"' in text and "--rdzv-backend=c10d" in text
    assert "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}" in text


def test_slurm_script_has_requeue_signal_and_one_task_per_node():
    text = (ROOT / "launch" / "slurm-2x8gpu.sbatch").read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@300", "#SBATCH --partition=gpu", "#SBATCH --time=24:00:00",
                 'scontrol show hostnames "$SLURM_JOB_NODELIST"', '"--rdzv-id=${SLURM_JOB_ID}"',
                 'scontrol requeue "$SLURM_JOB_ID"'):
        assert line in text, line
    cpu = (ROOT / "launch" / "slurm-cpu-2x2.sbatch").read_text()
    assert "--gpus-per-node" not in cpu and 'export CUDA_VISIBLE_DEVICES=""' in cpu and "parallel.backend=gloo" in cpu


def test_pytorchjob_manifest_has_the_fields():
    text = (ROOT / "launch" / "pytorchjob-2x8gpu.yaml").read_text()
    job = yaml.safe_load(text)
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    spec = job["spec"]
    assert spec["nprocPerNode"] == "8" and spec["elasticPolicy"]["rdzvBackend"] == "c10d"
    assert spec["elasticPolicy"]["minReplicas"] == spec["elasticPolicy"]["maxReplicas"] == 2
    replicas = spec["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 1
    for r in replicas.values():
        assert r["restartPolicy"] == "OnFailure"
        pod = r["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] >= 60
        (c,) = pod["containers"]
        assert c["image"] == "registry.example.com/ecdit:latest"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
        cmd = c["command"]
        assert cmd[0] == "torchrun" and "--nnodes=2" in cmd and "--nproc-per-node=8" in cmd
        assert "--rdzv-endpoint=$(MASTER_ADDR):$(MASTER_PORT)" in cmd and "--rdzv-backend=c10d" in cmd
        assert cmd[cmd.index("--config") + 1] == "configs/tiny-cpu.yaml" and "parallel.ep=4" in cmd
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and "TORCH_FR_BUFFER_SIZE" in env


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfiles_pass_hadolint(dockerfile):
    out = subprocess.run([tool("hadolint"), str(ROOT / "docker" / dockerfile)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    text = (ROOT / "docker" / dockerfile).read_text()
    assert 'ENTRYPOINT ["ecdit"]' in text and "USER 10001:10001" in text and "TORCH_VERSION=2.13.0" in text


@pytest.mark.parametrize("kind,extra", [("slurm", []), ("local", []), ("k8s", ["--image", "x"])])
def test_world_size_mismatch_fails_before_anything_exists(kind, extra, tmp_path, capsys):
    out, run = tmp_path / "job", tmp_path / "run"
    code = ecdit(["launch", kind, *extra, "--config", str(TINY), "--nodes", "2", "--nproc-per-node", "3", "--cpu",
                  "--set", "parallel.dp_shard=2", "parallel.tp=2", f"run.dir={run}", "--out", str(out), "--run"])
    err = capsys.readouterr().err
    assert code == 2 and "= world size 6 does not fit" in err and "but the world size is 6" in err, err
    assert not out.exists() and not run.exists()


def test_hostfile_format_and_slots(tmp_path, capsys):
    hf = tmp_path / "hosts"
    hf.write_text("# comment\nworker-1 slots=4\n\nworker-2 slots=4  # trailing\n")
    assert read_hostfile(hf) == [("worker-1", 4), ("worker-2", 4)]
    for bad in ("worker-1\n", "worker-1 slots=x\n", "a slots=2\na slots=2\n"):
        hf.write_text(bad)
        with pytest.raises(LaunchError, match=str(hf)):
            read_hostfile(hf)
    hf.write_text("a slots=2\nb slots=2\n")
    assert ecdit(["launch", "hostfile", "--hostfile", str(hf), "--config", str(TINY), "--nodes", "2",
                  "--nproc-per-node", "4", "--cpu", "--out", str(tmp_path / "j.sh")]) == 2
    assert "more than the slots of a (slots=2), b (slots=2)" in capsys.readouterr().err


@pytest.mark.slow
def test_dry_run_prints_what_run_executes(tmp_path):
    """`--dry-run` text == the file `--run` writes and runs; the run trains (1 node x 2 ranks, 2 steps)."""
    run = tmp_path / "run"
    args = ["launch", "local", "--config", str(TINY), "--nodes", "1", "--nproc-per-node", "2", "--cpu", "--set",
            "parallel.ep=2", "train.steps=2", "logging.interval=1", "logging.progress=false",
            "logging.tensorboard=false", "sample.at_end=false", f"run.dir={run}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    dry = subprocess.run([sys.executable, "-m", "ecdit_dist.cli", *args, "--dry-run"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert dry.returncode == 0 and not run.exists(), dry.stderr
    job = tmp_path / "job.sh"
    real = subprocess.run([sys.executable, "-m", "ecdit_dist.cli", *args, "--out", str(job), "--run"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert real.returncode == 0, real.stdout + real.stderr + "".join(p.read_text() for p in (run / "logs").glob("*"))
    assert job.read_text() == dry.stdout
    assert f"+ bash {job}" in real.stderr
    assert [r for r in (run / "metrics.jsonl").read_text().splitlines() if r]
    assert (run / "logs" / "node-0.log").exists()


@pytest.mark.slow
def test_torchrun_failure_summary_names_the_cause(tmp_path):
    """The entry point records its error for torch elastic: the root-cause block shows it."""
    from ecdit_dist.parallel.local import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "ecdit_dist.train", "--config", str(TINY),
           "--set", "parallel.ep=3", f"run.dir={tmp_path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode != 0
    root = out.stderr.split("Root Cause (first observed failure):", 1)[1]
    assert "error_file: <N/A>" not in root and "error.json" in root, root
    assert "ConfigError: parallel.ep (3) must divide moe.num_experts (4)" in root, root
