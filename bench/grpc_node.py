"""A gRPC node for bench/grpc: grpcio's server on 127.0.0.1 only.

    python bench/grpc_node.py PORT [NAME]

test.Echo/Unary answers each request (raw bytes, no protobuf) with itself.
"""

import sys
from concurrent import futures

import grpc


def main():
    port = int(sys.argv[1])
    server = grpc.server(futures.ThreadPoolExecutor(16))
    handler = grpc.method_handlers_generic_handler(
        "test.Echo", {"Unary": grpc.unary_unary_rpc_method_handler(lambda request, _: request)}
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


if __name__ == "__main__":
    main()
