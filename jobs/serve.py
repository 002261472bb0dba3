"""Serve the final models with Ray Serve behind an OpenAI-compatible API and a chat page.

    python jobs/serve.py                          # minimind = models:/minimind-reason/latest,
                                                  # minimind-v = models:/minimind-vlm-sft/latest, on 127.0.0.1:8000
    MINIMIND_API_KEY=... python jobs/serve.py --text runs:/<id>/model --no-vision --port 8080
    python jobs/serve.py --host 0.0.0.0 --api-key-file /run/secrets/minimind-key   # the key from a file
    python jobs/serve.py --num-gpus 1 --wait-for-nodes --placement-timeout-s 900  # GPU nodes the autoscaler starts
    serve run serve_config.yaml                   # the same app from a Serve config file
    python jobs/serve.py --engine vllm --text models:/minimind-sft/3   # vLLM replicas (Ray Serve LLM), GPU only

Then: curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "minimind", "messages": [{"role": "user", "content": "你好"}]}'
or any OpenAI client with base_url="http://127.0.0.1:8000/v1"; the chat page is http://127.0.0.1:8000/.
The app keeps running after this script returns with --detach; stop it with `serve shutdown -y`.

Every request is bounded (header count and bytes, body bytes, messages, characters, images, image bytes,
pixels and aspect ratio, the time to its last token) and each model holds a bounded queue (more: 429 with
Retry-After). An app the cluster cannot place fails here with what is missing (e.g. "minimind needs 1 GPU
per replica x 1: 1 GPU in all; the cluster has 0") instead of Serve waiting for ever.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

LIMIT_FLAGS = {  # Limits fields with a flag each
    "max_tokens": "the most new tokens a request may ask for",
    "max_body_bytes": "413 past this",
    "max_messages": "413 past this",
    "max_message_chars": "characters in one message; 413 past this",
    "max_total_chars": "characters in all messages; 413 past this",
    "max_images": "per request",
    "max_image_bytes": "per image; 413 past this",
    "max_image_pixels": "per image, read from its header before decoding (the gateway's check and the model replicas' decoding "
                        "apply the same limit); 413 past this",
    "remote_image_timeout_s": "for one remote image, from the name lookup to the last byte",
}


def parse(argv=None):
    from minimind.serve.app import ModelSpec, ServeSettings
    from minimind.serve.protocol import Limits

    limits, spec, settings = Limits(), ModelSpec("", ""), ServeSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--text", default="models:/minimind-reason/latest", help="the text model `minimind` (default: %(default)s)"
    )
    parser.add_argument(
        "--vision", default="models:/minimind-vlm-sft/latest", help="the vision model `minimind-v` (default: %(default)s)"
    )
    parser.add_argument("--no-vision", action="store_true", help="serve the text model only")
    parser.add_argument(
        "--engine", choices=["minimind", "vllm"], default="minimind",
        help="minimind: our continuous-batching engine (CPU or GPU, text and vision); vllm: the text model as a "
        "Hugging Face folder in vLLM through Ray Serve LLM (needs a GPU and `pip install 'ray[llm]'`)",
    )
    parser.add_argument("--accelerator-type", default=None, help="--engine vllm: the GPU type to place on, e.g. H100")
    parser.add_argument("--storage-path", default=None,
                        help="--engine vllm: where the exported folder is staged for the replicas (default: ray_results/)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s; 0.0.0.0 exposes it)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key-file",
        default=None,
        help="require 'Authorization: Bearer KEY' with KEY read from this file on the "
        "gateway's node (the key itself is never a flag: flags show in `ps`)",
    )
    parser.add_argument(
        "--api-key-env",
        default="MINIMIND_API_KEY",
        help="else read KEY from this environment variable of the gateway's node (default: %(default)s; unset: no key)",
    )
    scale = parser.add_argument_group("replicas and resources")
    scale.add_argument("--replicas", default="1", help="replicas per model, or 'auto' for autoscaling (default: %(default)s)")
    scale.add_argument("--max-replicas", type=int, default=2, help="autoscaling ceiling (default: %(default)s)")
    scale.add_argument(
        "--gateway-replicas",
        type=int,
        default=settings.gateway_replicas,
        help="replicas of the HTTP gateway, 0.1 CPU each (default: %(default)s)",
    )
    scale.add_argument(
        "--num-cpus",
        type=float,
        default=None,
        help="CPUs per replica, also its torch threads (default: 1, less when the "
        "cluster has fewer CPUs than one per model replica plus the gateways' 0.1 each)",
    )
    scale.add_argument(
        "--num-gpus", type=float, default=None, help="GPUs per replica (default: 1 when the cluster has a GPU, else 0)"
    )
    scale.add_argument(
        "--max-batch-size", type=int, default=16, help="requests decoded together in a replica (default: %(default)s)"
    )
    scale.add_argument(
        "--batch-wait-ms", type=float, default=10.0, help="how long a batch waits for more requests (default: %(default)s)"
    )
    scale.add_argument(
        "--compile", choices=["auto", "on", "off"], default="auto",
        help="compile the decoding step in each replica (auto: on a CPU, one-row steps; see `minimind chat --help`)",
    )
    scale.add_argument(
        "--max-queued-requests",
        type=int,
        default=spec.max_queued_requests,
        help="requests waiting for a model's "
        "replicas, per gateway replica, beyond 4 x --max-batch-size in each replica; more get 429 (default: %(default)s)",
    )
    scale.add_argument(
        "--placement-timeout-s",
        type=float,
        default=None,
        help="fail when by then replicas are still unplaced for "
        "want of resources; placed replicas loading a model are waited for (default: 60, or 900 with --wait-for-nodes)",
    )
    scale.add_argument(
        "--wait-for-nodes",
        action="store_true",
        help="the resources may come with nodes an autoscaler starts: "
        "wait for them instead of failing at once when the nodes up now lack them",
    )
    bounds = parser.add_argument_group("request limits (each refused with OpenAI's error shape)")
    bounds.add_argument(
        "--request-timeout-s",
        type=float,
        default=settings.request_timeout_s,
        help="from a request's arrival to "
        "its reply's last token; later: 504, and the replica stops decoding it (default: %(default)s)",
    )
    for name, what in LIMIT_FLAGS.items():
        bounds.add_argument(
            "--" + name.replace("_", "-"),
            type=type(getattr(limits, name)),
            default=getattr(limits, name),
            help=f"{what} (default: %(default)s)",
        )
    bounds.add_argument(
        "--allow-remote-images",
        action="store_true",
        help="let requests name http(s) image URLs for the server to fetch (public addresses only, no redirects)",
    )
    parser.add_argument("--detach", action="store_true", help="return once the app is up instead of serving until Ctrl-C")
    return parser.parse_args(argv)


def settings_from(args):
    import ray

    from minimind.serve.app import GATEWAY_CPUS, ModelSpec, ServeSettings, read_api_key
    from minimind.serve.protocol import Limits

    resources = ray.cluster_resources()
    gpus = args.num_gpus if args.num_gpus is not None else (1.0 if resources.get("GPU", 0) >= 1 else 0.0)
    cpus = args.num_cpus
    if cpus is None:  # every replica must fit beside the gateways, or Serve waits for ever to place one
        replicas = (1 if args.no_vision else 2) * (1 if args.replicas == "auto" else int(args.replicas))
        cpus = max(0.1, min(1.0, (resources.get("CPU", 1) - GATEWAY_CPUS * args.gateway_replicas) / replicas))
    common = dict(
        num_replicas=args.replicas if args.replicas == "auto" else int(args.replicas),
        max_replicas=args.max_replicas,
        num_cpus=cpus,
        num_gpus=gpus,
        max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
        compile=args.compile,
        max_queued_requests=args.max_queued_requests,
    )
    models = [ModelSpec("minimind", args.text, **common)]
    if not args.no_vision:
        models.append(ModelSpec("minimind-v", args.vision, **common))
    limits = Limits(allow_remote_images=args.allow_remote_images, **{name: getattr(args, name) for name in LIMIT_FLAGS})
    import mlflow

    from minimind import tracking

    tracking.configure()
    settings = ServeSettings(
        models=models,
        limits=limits,
        api_key_file=args.api_key_file,
        api_key_env=args.api_key_env,
        tracking_uri=mlflow.get_tracking_uri(),
        gateway_replicas=args.gateway_replicas,
        request_timeout_s=args.request_timeout_s,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1") and not read_api_key(args.api_key_file, args.api_key_env):
        print(
            f"WARNING: serving on {args.host} without an API key: anyone who reaches it can use the models "
            f"(set ${args.api_key_env} or --api-key-file)",
            file=sys.stderr,
        )
    return settings


def replica_needs(settings) -> dict[str, tuple[int, dict[str, float]]]:
    """Per deployment: the replicas it starts with and what each one takes."""
    from minimind.serve.app import GATEWAY_CPUS

    needs = {"Gateway": (settings.gateway_replicas, {"CPU": GATEWAY_CPUS, "GPU": 0.0})}
    for spec in settings.models:
        replicas = 1 if spec.num_replicas == "auto" else int(spec.num_replicas)
        needs[spec.name] = (replicas, {"CPU": spec.num_cpus, "GPU": spec.num_gpus})
    return needs


def shortfall(settings, totals: dict, nodes: list[dict]) -> str | None:
    """What the app needs that a cluster with these resources (in all, and per node) lacks, in words."""
    needs, missing = replica_needs(settings), []
    for resource in ("CPU", "GPU"):
        wanted = {name: (count, each[resource]) for name, (count, each) in needs.items() if count and each[resource]}
        total = sum(count * each for count, each in wanted.values())
        if total > totals.get(resource, 0) + 1e-6:
            who = ", ".join(f"{name} needs {each:g} {resource} per replica x {count}" for name, (count, each) in wanted.items())
            missing.append(f"{who}: {total:g} {resource} in all; the cluster has {totals.get(resource, 0):g}")
            continue
        largest = max((node.get(resource, 0) for node in nodes), default=0)
        missing += [
            f"{name} needs {each:g} {resource} per replica; the largest node has {largest:g}"
            for name, (count, each) in wanted.items()
            if each > largest + 1e-6
        ]
    return "; ".join(missing) or None


def cluster_now() -> tuple[dict, list[dict]]:
    import ray

    return ray.cluster_resources(), [node["Resources"] for node in ray.nodes() if node["Alive"]]


def deploy(app, settings, timeout_s: float, name: str = "minimind", route_prefix: str = "/") -> None:
    """Run the app and wait until it is RUNNING. Fails (and deletes it) when Serve says it failed, or when by
    `timeout_s` its replicas are still unplaced for want of resources; a replica that is placed and still
    loading its model is waited for."""
    from ray import serve

    serve.run_many(
        [serve.RunTarget(app, name=name, route_prefix=route_prefix)],
        wait_for_ingress_deployment_creation=False,
        wait_for_applications_running=False,
    )
    deadline = time.monotonic() + timeout_s
    while (status := serve.status().applications.get(name)) is None or status.status != "RUNNING":
        problem = None
        if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            problem = f"the app failed to start: {status.message or ''} " + " ".join(
                f"{deployment}: {overview.message}" for deployment, overview in status.deployments.items() if overview.message
            )
        elif time.monotonic() > deadline:
            overviews = status.deployments.values() if status else ()
            unscheduled = [overview.message for overview in overviews if "to be scheduled" in overview.message]
            missing = shortfall(settings, *cluster_now()) or (unscheduled[0] if unscheduled else None)
            if missing:
                problem = f"the replicas could not be placed within {timeout_s:g} s: {missing}"
        if problem:
            serve.delete(name, _blocking=False)  # Serve waits out a graceful shutdown of replicas that never started
            raise SystemExit(problem.strip())
        time.sleep(0.5)


def serve_with_vllm(args) -> None:
    from ray import serve

    from minimind.driver.inputs import storage_path_of
    from minimind.serve.vllm_app import build_vllm_app, import_serve_llm, llm_config, refuse_without_gpu, stage_hf_folder

    if not args.wait_for_nodes:
        refuse_without_gpu(cluster_now()[0])
    import_serve_llm()  # before exporting anything
    if not args.no_vision:
        print("--engine vllm serves the text model only (MiniMind-V has no vLLM architecture)", file=sys.stderr)
    from minimind import tracking

    tracking.configure()
    staged = stage_hf_folder(args.text, storage_path_of(args.storage_path))
    config = llm_config("minimind", staged, args.replicas, args.max_replicas, args.accelerator_type)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"WARNING: serving on {args.host}: Ray Serve LLM's app checks no API key", file=sys.stderr)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_vllm_app([config]), name="minimind", route_prefix="/")
    print(f"serving {args.text} in vLLM on http://{args.host}:{args.port}/v1 (model name: minimind)")
    while not args.detach:  # until Ctrl-C
        time.sleep(10)


def main(argv=None):
    import ray
    from ray import serve

    from minimind.serve.app import build

    args = parse(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        ray.init()
    if args.engine == "vllm":
        return serve_with_vllm(args)
    settings = settings_from(args)
    if not args.wait_for_nodes and (missing := shortfall(settings, *cluster_now())):
        raise SystemExit(f"this cluster cannot place the app: {missing} (for nodes an autoscaler starts, pass --wait-for-nodes)")
    # the proxy's own end-to-end timeout only backs up the gateway's, which answers in OpenAI's shape
    serve.start(http_options={"host": args.host, "port": args.port, "request_timeout_s": args.request_timeout_s + 30})
    timeout = args.placement_timeout_s if args.placement_timeout_s is not None else (900 if args.wait_for_nodes else 60)
    deploy(build(settings), settings, timeout)
    print(f"serving on http://{args.host}:{args.port}/ (OpenAI base_url http://{args.host}:{args.port}/v1)")
    if not args.detach:
        while True:  # until Ctrl-C
            time.sleep(10)


if __name__ == "__main__":
    main()
