"""The load test of a kiln server, where `locust` looks for it (the file is in the package).

    locust --headless --host http://127.0.0.1:7860 --users 8 --spawn-rate 8 --run-time 30s
"""

from kiln.serve.locustfile import KilnUser

__all__ = ["KilnUser"]
