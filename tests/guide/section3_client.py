# The guide's section 3 "Test simple" client, verbatim (websocket-quickstart, §3).
# tests/test_guide.py runs it against `gathering-lab serve`, changing only the
# port in `uri` and the final idle timeout, so the test does not wait 10 s.
import asyncio
import websockets
import json

async def test_websocket():
    uri = "ws://localhost:8000/ws/dashboard?client_id=python-test"

    async with websockets.connect(uri) as ws:
        # Receive connection confirmation
        message = await ws.recv()
        print(f"Connected: {json.loads(message)}")

        # Send ping
        await ws.send(json.dumps({"type": "ping"}))

        # Receive pong
        pong = await ws.recv()
        print(f"Pong: {json.loads(pong)}")

        # Listen for events (10 seconds)
        try:
            while True:
                message = await asyncio.wait_for(ws.recv(), timeout=10.0)
                data = json.loads(message)
                print(f"Event: {data['type']} - {data.get('data')}")
        except asyncio.TimeoutError:
            print("Timeout - no more events")

asyncio.run(test_websocket())
