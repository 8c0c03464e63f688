"""Start the demo: `python app.py [--host H] [--port P] [--share] [--model NAME] [--weights FILE] [--device D]
[--dtype T] [--runtime R] [--batch-size N] [--max-batch N] [--compile] [--size N|WxH] [--backend URL]`."""
import argparse
import logging
import os

from rmbg_demo.arguments import add_compile_argument, add_memory_argument, add_model_arguments, size_text
from rmbg_demo.engines import configure_torch
from rmbg_demo.fetch import allow_private_default


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="RMBG-2.0 background removal demo (Gradio)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    add_model_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=4, metavar="N",
                        help="images per network batch in the Batch and video tabs (default 4)")
    parser.add_argument("--max-batch", type=int, metavar="N",
                        help="concurrent requests share network batches of up to N images "
                             "(default: 8 on a GPU, 1 = off on the CPU)")
    add_compile_argument(parser)
    parser.add_argument("--size", metavar="N|WxH", default="auto", type=size_text,
                        help="the page's default network resolution (default: each model's own)")
    parser.add_argument("--max-video-seconds", type=float, default=60, metavar="S",
                        help="refuse longer clips in the video tab (default 60; 0: no limit)")
    parser.add_argument("--allow-private-urls", action="store_true", default=allow_private_default(),
                        help="let the URL tab fetch loopback/private addresses (intranets, tests)")
    add_memory_argument(parser)
    parser.add_argument("--backend", metavar="URL",
                        help="a running `rmbg serve` (http://HOST:PORT) that runs the network; this page only "
                             "decodes and composes, so it can live on a small machine (a service with API keys: "
                             "set RMBG_API_KEY=KEY)")
    args = parser.parse_args(argv)
    if args.backend and (args.weights or args.compile or args.device != "auto" or args.dtype != "auto"
                         or args.runtime != "auto"):
        parser.error("--weights, --compile, --device, --dtype and --runtime belong to `rmbg serve` when --backend is "
                     "given")
    return args, parser


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args, parser = parse_args(argv)
    from rmbg_demo.client import RemoteError, RemoteRemover

    if args.backend:  # asked before Gradio is imported, so that a page without its service says so at once
        try:
            RemoteRemover(args.backend, timeout=30).models()
        except RemoteError as exc:
            parser.error(f"--backend: {exc} (start the service first: rmbg serve --host 0.0.0.0)")
    # Imported after parsing, so that --help answers at once.
    from rmbg_demo.gradio_compat import guard_cache_cleaning
    from rmbg_demo.ui import DemoConfig, build_demo

    configure_torch(args.device)
    guard_cache_cleaning()
    config = DemoConfig(model=args.model, weights=args.weights, device=args.device, dtype=args.dtype,
                        runtime=args.runtime, allow_private_urls=args.allow_private_urls,
                        batch_size=max(1, args.batch_size),
                        max_batch=args.max_batch, compile=args.compile,
                        resolution=args.size, max_video_seconds=args.max_video_seconds or None,
                        backend=args.backend, max_memory=args.max_memory)
    try:
        demo = build_demo(config)
    except (RemoteError, ValueError) as exc:
        if not args.backend:
            raise
        parser.error(f"--backend: {exc} (start the service first: rmbg serve --host 0.0.0.0)")
    demo.launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
