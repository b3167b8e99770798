// The inspector page: asks POST /admin/inspect and draws the answer. Every value from the
// service is set as text (never as HTML): titles and ids come from data.
"use strict";

const API = "/admin/inspect";
const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function label(item) {
  return item.title ? `${item.title} (${item.item_id})` : item.item_id;
}

function itemRow(item) {
  const li = el("li", { "data-item": item.item_id });
  if (item.interest !== undefined && item.interest !== null) {
    li.append(el("span", { class: `chip k${item.interest % 8}`, title: `interest ${item.interest}` },
                 item.interest));
  }
  li.append(label(item), el("span", { class: "score" }, item.score.toFixed(3)));
  return li;
}

function list(title, items, id, extra) {
  const box = el("div", { class: "list", id });
  box.append(el("h3", {}, el("span", {}, title), el("span", { class: "score" }, extra || "")));
  return box;
}

function column(title, items, id, extra, weight, k) {
  const box = list(title, items, id, extra);
  if (weight !== undefined) {
    const bar = el("span", { class: `k${k % 8}` });
    bar.style.width = `${Math.round(weight * 100)}%`;
    box.append(el("div", { class: "weight" }, bar));
  }
  box.append(el("ol", {}, ...items.map(itemRow)));
  return box;
}

const FALLBACKS = {
  no_history: "No history for this user in Redis: the service answers with popular items.",
  cold_start: "None of this user's clicks is in the bundle's vocabulary: the service answers " +
              "with popular items.",
  history_unavailable: "Redis could not be read: the service answers with popular items " +
                       "until it can.",
};

function draw(a) {
  $("summary").textContent =
    `user ${a.user_id} · bundle ${a.version} · K = ${a.K} · ${a.history.length} clicks read`;
  $("history").replaceChildren(...a.history.map((c) => el("li", {
    class: [c.known ? "" : "unknown", c.in_window ? "window" : ""].join(" ").trim(),
    "data-item": c.item_id,
  }, label(c))));
  const personal = a.fallback === null;
  $("personal").hidden = !personal;
  $("fallback").hidden = personal;
  if (personal) {
    $("interests").replaceChildren(...a.interests.map((i) => column(
      `interest ${i.k}`, i.items, `interest-${i.k}`, `weight ${i.weight.toFixed(3)}`, i.weight, i.k)));
    $("answers").replaceChildren(
      column("aggregate", a.aggregate, "answer-aggregate"),
      ...Object.entries(a.merges).map(([how, items]) => column(`merge: ${how}`, items, `answer-${how}`)));
    setStatus("", "");
  } else {
    $("popular").replaceChildren(column("popular", a.popular, "answer-popular"));
    setStatus(FALLBACKS[a.fallback] || a.fallback, "warn");
  }
  $("result").hidden = false;
}

function setStatus(text, kind) {
  const s = $("status");
  s.textContent = text;
  s.className = kind;
  s.hidden = !text;
}

async function ask(event) {
  event.preventDefault();
  const user = $("user").value.trim();
  const token = $("token").value;
  sessionStorage.setItem("sine-inspector-token", token);
  const url = new URL(window.location);
  url.searchParams.set("user", user);
  history.replaceState(null, "", url);
  setStatus("Asking…", "");
  const headers = { "Content-Type": "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  let answer;
  try {
    const r = await fetch(API, {
      method: "POST", headers, body: JSON.stringify({ user_id: user, n: Number($("n").value) }),
    });
    answer = await r.json();
    if (!r.ok) {
      $("result").hidden = true;
      setStatus(`${r.status} ${answer.title}: ${answer.detail}`, "error");
      return;
    }
  } catch (e) {
    $("result").hidden = true;
    setStatus(`The service did not answer: ${e}`, "error");
    return;
  }
  draw(answer);
}

document.addEventListener("DOMContentLoaded", () => {
  $("token").value = sessionStorage.getItem("sine-inspector-token") || "";
  $("ask").addEventListener("submit", ask);
  const user = new URL(window.location).searchParams.get("user");
  if (user) {
    $("user").value = user;
    $("ask").requestSubmit();
  }
});
