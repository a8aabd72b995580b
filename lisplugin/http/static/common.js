// Shared by every page: JSON calls with the session's CSRF token, log out, clickable rows.
"use strict";

const lisplugin = (() => {
  const csrf = () => document.querySelector('meta[name="csrf-token"]')?.content || "";

  /** fetch() a JSON API route; throws an Error with the server's reason on failure. */
  async function api(method, path, body) {
    const headers = { Accept: "application/json", "X-CSRF-Token": csrf() };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(path, {
      method,
      headers,
      credentials: "same-origin",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (response.status === 401) {
      window.location.assign("/login?next=" + encodeURIComponent(location.pathname));
      throw new Error("signed out");
    }
    const data = response.status === 204 ? null : await response.json().catch(() => null);
    if (!response.ok) {
      const detail = data && data.detail;
      const error = new Error(
        typeof detail === "string" ? detail : `request failed (${response.status})`
      );
      error.status = response.status;
      throw error;
    }
    return data;
  }

  document.addEventListener("DOMContentLoaded", () => {
    document.getElementById("log-out")?.addEventListener("click", async () => {
      try {
        await api("DELETE", "/api/session");
      } finally {
        window.location.assign("/login");
      }
    });
    for (const row of document.querySelectorAll("tr[data-href]")) {
      row.addEventListener("click", (event) => {
        if (!event.target.closest("a")) window.location.assign(row.dataset.href);
      });
    }
  });

  return { api };
})();
