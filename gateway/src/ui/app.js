// The cmx-gateway dashboard: reads /api/v1/ and follows the event stream (/api/v1/events).
// Everything a peer controls (user names, requests, reasons) is shown with textContent only:
// never parsed as HTML.
"use strict";

const AUDIT_ROWS = 200;
let token = sessionStorage.getItem("cmx-token") || "";
let lastSeq = 0;
let refreshQueued = false;

function headers() {
  return token ? { Authorization: "Bearer " + token } : {};
}

function setStatus(text, isError) {
  const s = document.getElementById("status");
  s.textContent = text;
  s.className = isError ? "status error" : "status";
}

async function api(path, options) {
  const r = await fetch("/api/v1/" + path, Object.assign({ headers: headers() }, options || {}));
  if (r.status === 401 || r.status === 403) {
    document.getElementById("token-form").hidden = false;
  }
  const body = await r.json();
  if (!r.ok) {
    throw new Error(body.error || r.statusText);
  }
  return body;
}

function when(secs) {
  return secs ? new Date(secs * 1000).toLocaleString() : "";
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function fill(id, items, render) {
  const body = document.querySelector("#" + id + " tbody");
  const rows = items.map((item) => {
    const tr = document.createElement("tr");
    render(tr, item);
    return tr;
  });
  body.replaceChildren(...rows);
}

async function disconnect(id, button) {
  button.disabled = true;
  try {
    await api("sessions/" + encodeURIComponent(id) + "/disconnect", { method: "POST" });
    setStatus("disconnected " + id, false);
  } catch (e) {
    setStatus("disconnect " + id + ": " + e.message, true);
  }
  scheduleRefresh();
}

async function refresh() {
  refreshQueued = false;
  try {
    // One after the other, on one kept-alive connection: the admin endpoint serves a few
    // connections per peer (admin.max_connections_per_peer), and the audit stream holds one.
    const ids = await api("identities");
    const sessions = await api("sessions");
    const forwards = await api("forwards");
    const pairs = await api("pairs");
    document.getElementById("summary").textContent =
      ids.identities.length + " identities, " + sessions.sessions.length + " sessions, " +
      forwards.forwards.length + " forwards, " + pairs.pairs.length + " pairs";
    const door = sessions.front_door;
    const doorEl = document.getElementById("front-door");
    const sources = (n) => n + (n === 1 ? " source" : " sources");
    doorEl.textContent = "front door: " + door.unauthenticated + " unauthenticated, " +
      sources(door.penalized_sources) + " penalized, " + sources(door.known_sources) +
      " known from a login in the last 24 h";
    doorEl.dataset.unauthenticated = door.unauthenticated;
    doorEl.dataset.penalized = door.penalized_sources;
    doorEl.dataset.known = door.known_sources;
    doorEl.classList.toggle("alert", door.penalized_sources > 0);
    fill("sessions", sessions.sessions, (tr, s) => {
      tr.dataset.identity = s.identity;
      tr.dataset.session = s.id;
      cell(tr, s.id); cell(tr, s.identity); cell(tr, s.peer, "addr"); cell(tr, when(s.since));
      cell(tr, s.credential, "mono"); cell(tr, s.channels, "num");
      cell(tr, s.bytes_from_peer + " / " + s.bytes_to_peer, "num");
      const td = cell(tr, "");
      const b = document.createElement("button");
      b.className = "disconnect";
      b.dataset.disconnect = s.id;
      b.textContent = s.closing ? "closing…" : "Disconnect";
      b.disabled = Boolean(s.closing);
      b.addEventListener("click", () => disconnect(s.id, b));
      td.appendChild(b);
    });
    fill("pairs", pairs.pairs, (tr, p) => {
      tr.dataset.device = p.device;
      cell(tr, p.conn_id, "num"); cell(tr, p.device); cell(tr, p.server || "(outside)");
      cell(tr, p.target, "addr"); cell(tr, p.bytes_to_target, "num");
      cell(tr, p.bytes_from_target, "num"); cell(tr, p.spliced ? "yes" : "no"); cell(tr, when(p.since));
    });
    fill("forwards", forwards.forwards, (tr, f) => {
      cell(tr, f.identity); cell(tr, f.address, "addr"); cell(tr, f.port, "num");
      cell(tr, f.session); cell(tr, when(f.since)); cell(tr, f.takeovers, "num");
    });
    fill("identities", ids.identities, (tr, i) => {
      tr.dataset.identity = i.name;
      cell(tr, i.name); cell(tr, i.role); cell(tr, i.address, "addr");
      cell(tr, i.permit_listen, "mono"); cell(tr, i.permit_open, "mono"); cell(tr, i.sessions, "num");
    });
    setStatus("updated " + new Date().toLocaleTimeString(), false);
  } catch (e) {
    setStatus(e.message, true);
  }
}

function scheduleRefresh() {
  if (!refreshQueued) {
    refreshQueued = true;
    setTimeout(refresh, 200);
  }
}

function auditFilter() {
  const f = {
    identity: document.getElementById("filter-identity").value.trim(),
    decision: document.getElementById("filter-decision").value,
    event: document.getElementById("filter-event").value.trim(),
  };
  return (r) => (!f.identity || r.identity === f.identity) &&
    (!f.decision || r.decision === f.decision) && (!f.event || r.event === f.event);
}

const auditLines = [];

function renderAudit() {
  const keep = auditFilter();
  const shown = auditLines.filter(keep).slice(-AUDIT_ROWS).reverse();
  fill("audit", shown, (tr, r) => {
    if (r.decision === "deny") tr.className = "deny";
    tr.dataset.seq = r.seq;
    cell(tr, new Date(r.time).toLocaleTimeString()); cell(tr, r.event); cell(tr, r.decision);
    cell(tr, r.identity); cell(tr, r.peer || r.session || r.source, "addr"); cell(tr, r.request, "mono");
    cell(tr, r.reason || r.result || r.rule || r.message);
  });
}

function addAudit(record) {
  if (record.seq <= lastSeq) return;
  lastSeq = record.seq;
  auditLines.push(record);
  if (auditLines.length > 4 * AUDIT_ROWS) auditLines.splice(0, auditLines.length - 4 * AUDIT_ROWS);
  renderAudit();
  scheduleRefresh();
}

// The event stream: Server-Sent Events read with fetch (EventSource cannot send the token):
// audit lines, and changes (sessions, forwards, pairs) that make the tables refresh. The gateway
// ends each stream after a while; we reconnect from the last audit line we saw and refresh.
async function follow() {
  for (;;) {
    try {
      const r = await fetch("/api/v1/events?after=" + lastSeq, { headers: headers() });
      if (!r.ok) throw new Error("event stream: HTTP " + r.status);
      // Changes are not replayed: what happened while we were away is in the tables.
      scheduleRefresh();
      const reader = r.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const lines = block.split("\n");
          const type = (lines.find((l) => l.startsWith("event: ")) || "event: message").slice(7);
          const data = lines.filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
          if (!data) continue;
          // A session, forward or pair came or went: read the tables again.
          if (type === "change") scheduleRefresh();
          else if (type === "audit") addAudit(JSON.parse(data));
        }
      }
    } catch (e) {
      setStatus(e.message, true);
    }
    await new Promise((done) => setTimeout(done, 1000));
  }
}

document.getElementById("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  token = document.getElementById("token").value.trim();
  sessionStorage.setItem("cmx-token", token);
  document.getElementById("token-form").hidden = true;
  refresh();
});
document.getElementById("audit-filter").addEventListener("input", renderAudit);
refresh();
// Byte counters move without events: a slow poll keeps them current.
setInterval(refresh, 5000);
follow();
