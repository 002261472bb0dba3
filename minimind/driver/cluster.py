"""Where a stage's workers run and what they can read: on a real cluster the driver's disk is its own,
GPU nodes come and go with the autoscaler, and the head trains nothing.

    workers_see_driver_disk()   did this process start the Ray instance (then every worker is on this machine)?
    stage_inputs()              copy the driver-local inputs to the run's folder on Ray storage
    placement()                 GPUs or CPUs, and CPUs per worker, in a way that lets an autoscaler add GPU nodes
"""

from __future__ import annotations

import shutil
from pathlib import Path

from minimind import storage
from minimind.model.vision import VISION_CONFIG_NAME, VISION_DIR, VisionConfig, is_vlm_dir


def local_input(location: str) -> Path:
    """A data or model input as a path on this machine: storage URIs are fetched (workers fetch them too)."""
    return storage.fetch(location) if storage.is_uri(location) else Path(location).resolve()


def workers_see_driver_disk() -> bool:
    """True when this process started its own Ray instance (`ray.init()` with no cluster to join): every
    worker then runs on this machine. A driver that joined a cluster (`ray job submit`, `RAY_ADDRESS`)
    cannot know which nodes its workers land on, nor which ones the autoscaler adds later."""
    from ray._private import worker  # no public API tells whether ray.init() started the instance

    node = getattr(worker, "_global_node", None)
    return bool(getattr(node, "head", False))


def stage_inputs(inputs: dict, destination: str, work: Path, given: dict, on_storage: set = frozenset()) -> dict:
    """Copy every input a worker reads from this machine's disk to the run's folder on Ray storage; an
    input the user gave as a storage URI, or one that is on Ray storage already (`on_storage`: the
    prepared data), is passed on as it is. Returns what the workers get."""
    staged = {}
    for key, local in inputs.items():
        if local is None or key in on_storage or storage.is_uri(str(given.get(key) or "")):
            staged[key] = given.get(key) if local is not None else None
            continue
        local = Path(local)
        if key == "init_dir" and is_vlm_dir(local):
            local = _vlm_with_staged_tower(local, destination, work)
        staged[key] = storage.stage_input(
            local, storage.join(destination, key) if local.is_dir() else storage.join(destination, key, local.name)
        )
    print(f"inputs for the workers staged under {destination}")
    return staged


def _vlm_with_staged_tower(vlm_dir: Path, destination: str, work: Path) -> Path:
    """A copy of a VLM directory whose tower is referenced on storage, so that no worker, checkpoint or
    registered model points at a folder of this machine (the tower is staged once, not per checkpoint)."""
    config = VisionConfig.load(vlm_dir / VISION_CONFIG_NAME)
    tower = vlm_dir / VISION_DIR if config.vision_model == VISION_DIR else Path(config.vision_model)
    if storage.is_uri(config.vision_model) or not tower.exists():
        return vlm_dir  # on storage already, or a hub id every node can download
    config.vision_model = storage.stage_input(tower, storage.join(destination, "vision_tower"))
    staged = work / "staged-init"
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(vlm_dir, staged, ignore=lambda folder, names: [VISION_DIR] if Path(folder) == vlm_dir else [])
    config.save(staged / VISION_CONFIG_NAME)
    return staged


AUTOSCALING_CONFIG = Path("~/ray_bootstrap_config.yaml")  # where the Ray cluster launcher leaves it on the head
GPU_WORKER_CPUS = 2.0  # CPUs per GPU worker unless told: fits any GPU node, leaves room for a second worker


def launchable_gpu_node_types(config_path: Path | None = None) -> list[str]:
    """Node types with GPUs that the cluster's autoscaler may start (none without a launcher config)."""
    import yaml

    path = (config_path or AUTOSCALING_CONFIG).expanduser()
    if not path.is_file():
        return []
    node_types = (yaml.safe_load(path.read_text()) or {}).get("available_node_types", {})
    return [
        name
        for name, spec in node_types.items()
        if (spec.get("resources") or {}).get("GPU", 0) > 0 and spec.get("max_workers", 1) > 0
    ]


def placement(config) -> tuple[bool, float, str]:
    """(use GPUs, CPUs per worker, one line saying why). `--use-gpu` always asks for GPUs and lets the
    autoscaler bring them; by default GPUs are used when the cluster has them or can launch nodes with
    them, and the line says when training runs on CPU. The autoscaler sees only what is requested, so
    deciding from the GPUs present now would train on the head's CPUs and never start a GPU node."""
    import ray

    needed = config.num_workers * (
        config.gpus_per_worker + getattr(config, "rollout_gpus", 0.0)
    )  # GRPO: each worker's rollout actor
    present = ray.cluster_resources().get("GPU", 0)
    if config.use_gpu is False:
        use_gpu, why = False, "--cpu"
    elif config.use_gpu:
        use_gpu, why = True, f"--use-gpu ({present:g} GPUs up now; the autoscaler adds nodes for the rest)"
    elif present >= needed:
        use_gpu, why = True, f"{present:g} GPUs in the Ray cluster"
    elif gpu_types := launchable_gpu_node_types():
        use_gpu, why = True, f"the autoscaler can launch GPU nodes ({', '.join(gpu_types)})"
    else:
        use_gpu, why = (
            False,
            f"no GPU for each of {config.num_workers} worker(s) in the Ray cluster ({present:g}), nor any it can launch",
        )
    cpus = config.cpus_per_worker
    if not cpus:  # the torch threads of a CPU worker; a GPU worker needs few
        largest_node = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]), default=1)
        cpus = GPU_WORKER_CPUS if use_gpu else float(max(1, int(largest_node) // config.num_workers))
    return use_gpu, cpus, f"training on {'GPU' if use_gpu else 'CPU'}: {why}; {cpus:g} CPUs per worker"
