"""A Lambda-style handler with a dependency: renders a jinja2 template."""

from jinja2 import Template

TEMPLATE = Template("Hello {{ who }}, you have {{ items | length }} item(s): {{ items | join(', ') }}")


def handler(event, context=None):
    event = event or {}
    return {"statusCode": 200,
            "body": TEMPLATE.render(who=event.get("who", "stranger"), items=event.get("items", []))}
