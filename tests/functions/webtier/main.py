"""Results at the edges of JSON: values strict JSON has no words for, integers beyond 64 bits,
a reply of many megabytes, and slow calls."""

import time


def echo(event):
    return event


def nan(event):
    return {"value": float("nan")}


def infinity(event):
    return [1, float("inf")]


def minus_infinity(event):
    return float("-inf")


def surrogate(event):
    return {"text": "half a pair: \ud800"}


def surrogate_key(event):
    return {"\udc00": 1}


def big_ints(event):
    return {"up": 2**70, "down": -2**80, "edge": [2**63 - 1, 2**64, -2**63 - 1]}


def huge(event):
    return [{}] * int(event["n"])


def sleep(event):
    time.sleep(float(event["s"]))
    return "slept"
