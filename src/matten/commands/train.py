"""`matten train`."""


def add_parser(subparsers):
    parser = subparsers.add_parser("train", help="(not yet available)")
    parser.set_defaults(run=lambda args: parser.error("not yet available"))
