"""zuul-lite web: status page, local change pages, JSON API and log browser.

`app.create_app` builds the FastAPI app; `server.WebServer` runs it with uvicorn.
"""
