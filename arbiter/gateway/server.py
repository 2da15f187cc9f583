"""The ASGI app uvicorn serves (`arbiter gateway`, or `uvicorn arbiter.gateway.server:app`): the gateway
built from this process's settings."""

from arbiter.gateway.app import create_gateway
from broker.settings import get_settings

app = create_gateway(get_settings())
