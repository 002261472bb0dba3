"""Serve the final models with Ray Serve behind an OpenAI-compatible API and a chat page.

    python jobs/serve.py                          # minimind = models:/minimind-reason/latest,
                                                  # minimind-v = models:/minimind-vlm-sft/latest, on 127.0.0.1:8000
    MINIMIND_API_KEY=... python jobs/serve.py --text runs:/<id>/model --no-vision --port 8080
    python jobs/serve.py --host 0.0.0.0 --api-key-file /run/secrets/minimind-key   # the key from a file
    serve run serve_config.yaml                   # the same app from a Serve config file

Then: curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "minimind", "messages": [{"role": "user", "content": "你好"}]}'
or any OpenAI client with base_url="http://127.0.0.1:8000/v1"; the chat page is http://127.0.0.1:8000/.
The app keeps running after this script returns with --detach; stop it with `serve shutdown -y`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", default="models:/minimind-reason/latest", help="the text model `minimind` (default: %(default)s)")
    parser.add_argument("--vision", default="models:/minimind-vlm-sft/latest", help="the vision model `minimind-v` (default: %(default)s)")
    parser.add_argument("--no-vision", action="store_true", help="serve the text model only")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s; 0.0.0.0 exposes it)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key-file", default=None, help="require 'Authorization: Bearer KEY' with KEY read from this file on the "
                        "gateway's node (the key itself is never a flag: flags show in `ps`)")
    parser.add_argument("--api-key-env", default="MINIMIND_API_KEY", help="else read KEY from this environment variable of the "
                        "gateway's node (default: %(default)s; unset: no key)")
    parser.add_argument("--replicas", default="1", help="replicas per model, or 'auto' for autoscaling (default: %(default)s)")
    parser.add_argument("--max-replicas", type=int, default=2, help="autoscaling ceiling (default: %(default)s)")
    parser.add_argument("--num-cpus", type=float, default=None, help="CPUs per replica, also its torch threads (default: 1, less when the "
                        "cluster has fewer CPUs than one per model replica plus the gateway's 0.1)")
    parser.add_argument("--num-gpus", type=float, default=None, help="GPUs per replica (default: 1 when the cluster has a GPU, else 0)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="requests decoded together in a replica (default: %(default)s)")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a batch waits for more requests (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=512, help="the most new tokens a request may ask for (default: %(default)s)")
    parser.add_argument("--allow-remote-images", action="store_true", help="let requests name http(s) image URLs for the server to fetch")
    parser.add_argument("--detach", action="store_true", help="return once the app is up instead of serving until Ctrl-C")
    return parser.parse_args(argv)


def settings_from(args):
    import ray

    from minimind.serve.app import ModelSpec, ServeSettings, read_api_key
    from minimind.serve.protocol import Limits

    resources = ray.cluster_resources()
    gpus = args.num_gpus if args.num_gpus is not None else (1.0 if resources.get("GPU", 0) >= 1 else 0.0)
    cpus = args.num_cpus
    if cpus is None:  # every replica must fit beside the gateway (0.1 CPU), or Serve waits for ever to place one
        replicas = (1 if args.no_vision else 2) * (1 if args.replicas == "auto" else int(args.replicas))
        cpus = max(0.1, min(1.0, (resources.get("CPU", 1) - 0.1) / replicas))
    common = dict(num_replicas=args.replicas if args.replicas == "auto" else int(args.replicas), max_replicas=args.max_replicas,
                  num_cpus=cpus, num_gpus=gpus, max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms)
    models = [ModelSpec("minimind", args.text, **common)]
    if not args.no_vision:
        models.append(ModelSpec("minimind-v", args.vision, **common))
    limits = Limits(max_tokens=args.max_tokens, allow_remote_images=args.allow_remote_images)
    import mlflow

    from minimind import tracking

    tracking.configure()
    settings = ServeSettings(models=models, limits=limits, api_key_file=args.api_key_file, api_key_env=args.api_key_env,
                             tracking_uri=mlflow.get_tracking_uri())
    if args.host not in ("127.0.0.1", "localhost", "::1") and not read_api_key(args.api_key_file, args.api_key_env):
        print(f"WARNING: serving on {args.host} without an API key: anyone who reaches it can use the models "
              f"(set ${args.api_key_env} or --api-key-file)", file=sys.stderr)
    return settings


def main(argv=None):
    import ray
    from ray import serve

    from minimind.serve.app import build

    args = parse(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        ray.init()
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build(settings_from(args)), name="minimind", route_prefix="/", blocking=not args.detach)
    print(f"serving on http://{args.host}:{args.port}/ (OpenAI base_url http://{args.host}:{args.port}/v1)")


if __name__ == "__main__":
    main()
