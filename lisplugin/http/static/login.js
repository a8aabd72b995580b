"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("sign-in");
  const error = document.getElementById("sign-in-error");
  const button = document.getElementById("sign-in-button");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.hidden = true;
    button.disabled = true;
    try {
      const response = await fetch("/api/session", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        credentials: "same-origin",
        body: JSON.stringify({
          username: form.username.value.trim(),
          password: form.password.value,
        }),
      });
      if (!response.ok) {
        const data = await response.json().catch(() => ({}));
        throw new Error(response.status === 401 ? "Wrong username or password." : data.detail || "Sign-in failed.");
      }
      // The session travels in the HttpOnly cookie; the token in the answer is for API clients.
      window.location.assign(form.dataset.next || "/worklist");
    } catch (failure) {
      error.textContent = failure.message;
      error.hidden = false;
      form.password.value = "";
      form.password.focus();
    } finally {
      button.disabled = false;
    }
  });
});
