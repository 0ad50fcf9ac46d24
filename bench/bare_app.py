"""The baseline: a bare Flask endpoint returning the request's JSON, run under the same
gunicorn settings as dockyard's control plane."""

from flask import Flask, Response, request

app = Flask(__name__)


@app.post("/echo")
def echo():
    return Response(request.get_data(), mimetype="application/json")
