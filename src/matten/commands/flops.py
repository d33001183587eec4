"""`matten flops`."""


def add_parser(subparsers):
    parser = subparsers.add_parser("flops", help="(not yet available)")
    parser.set_defaults(run=lambda args: parser.error("not yet available"))
