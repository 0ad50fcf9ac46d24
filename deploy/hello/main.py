"""The example container: no dependencies, two functions."""


def greet(event, context):
    who = (event or {}).get("who", "world")
    print(f"greeting {who}")
    return {"message": f"hello, {who}!", "version": context.version}


def echo(event):
    return event
