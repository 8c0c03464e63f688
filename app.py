"""Start the demo: `python app.py [--host H] [--port P] [--share] [--model NAME] [--weights FILE] [--device D]
[--dtype T] [--max-batch N] [--compile]`."""
import argparse
import logging
import os

from rmbg_demo.engines import configure_torch
from rmbg_demo.fetch import allow_private_default
from rmbg_demo.options import add_compile_argument, add_model_arguments


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="RMBG-2.0 background removal demo (Gradio)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    add_model_arguments(parser)
    parser.add_argument("--max-batch", type=int, metavar="N",
                        help="concurrent requests share network batches of up to N images "
                             "(default: 8 on a GPU, 1 = off on the CPU)")
    add_compile_argument(parser)
    parser.add_argument("--allow-private-urls", action="store_true", default=allow_private_default(),
                        help="let the URL tab fetch loopback/private addresses (intranets, tests)")
    return parser.parse_args(argv)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    # Imported after parsing, so that --help answers at once.
    from rmbg_demo.gradio_compat import guard_cache_cleaning
    from rmbg_demo.ui import DemoConfig, build_demo

    configure_torch(args.device)
    guard_cache_cleaning()
    config = DemoConfig(model=args.model, weights=args.weights, device=args.device, dtype=args.dtype,
                        allow_private_urls=args.allow_private_urls, max_batch=args.max_batch, compile=args.compile)
    demo = build_demo(config)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
