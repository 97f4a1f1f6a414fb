import time
from fastapi.testclient import TestClient
from tests.support.world import People
from tests.unit.consortium_server.reports.world import populate

def test_smoke(client: TestClient, people: People, app, tmp_path) -> None:
    t=time.perf_counter()
    populate(client, people, app)
    print("populate", time.perf_counter()-t); t=time.perf_counter()
    r = client.get("/reports/compliance", headers=people.compliance)
    print("html", time.perf_counter()-t); t=time.perf_counter()
    r = client.get("/reports/compliance?format=pdf", headers=people.compliance)
    print("pdf", time.perf_counter()-t); t=time.perf_counter()
    r = client.get("/reports/compliance?format=json", headers=people.compliance)
    print("json", time.perf_counter()-t); t=time.perf_counter()
