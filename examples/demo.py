"""The main job on the embedded defaults: a stateful session, a chart, an error, a command and files."""

import base64
import time

from sandlot import Sandbox

t0 = time.perf_counter()
with Sandbox() as sb:  # default template "python", process tier, all fences on
    print(f"sandbox {sb.sandbox_id} ready in {(time.perf_counter() - t0) * 1000:.0f} ms")
    sb.run_code("import pandas as pd; df = pd.DataFrame({'a': [1, 2, 3]})")
    print("df.a.sum() ->", sb.run_code("df.a.sum()").text)  # state persists: '6'
    ex = sb.run_code("import matplotlib.pyplot as plt; plt.plot([1, 2]); plt.show()")
    png = base64.b64decode(ex.results[0].png)
    with open("demo-chart.png", "wb") as f:
        f.write(png)
    print(f"chart -> demo-chart.png ({len(png)} bytes)")
    ex = sb.run_code("1/0")
    print("error ->", ex.error.name, "|", ex.error.traceback.strip().splitlines()[-1])
    r = sb.commands.run("echo hi; exit 3")
    print(f"command -> exit {r.exit_code}, stdout {r.stdout!r}")
    sb.files.write("/home/user/data.csv", b"a,b\n1,2\n")
    print("file ->", repr(sb.files.read("/home/user/data.csv")))
    ex = sb.run_code("import time; time.sleep(60)", timeout=1)
    print("timeout ->", ex.error.value)
    print("session alive after the timeout:", sb.run_code("df.a.sum()").text)
    print("inside:", sb.commands.run("id; cat /proc/self/uid_map; ls /").stdout)
print("sandbox gone")
