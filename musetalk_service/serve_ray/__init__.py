"""Ray Serve mode (`pip install 'musetalk-service[ray]'`, `musetalk-service serve --ray`).

app.py builds the application (an HTTP ingress and an engine deployment), replica.py is the
engine replica, remote.py the ingress's proxy of it. Nothing else in the package imports this one.
"""
