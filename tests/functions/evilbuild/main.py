def hello(event):
    return "built"
